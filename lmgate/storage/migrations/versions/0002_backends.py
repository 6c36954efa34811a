"""Managed backends: workers, per-model state and start-time history.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "backend_instances",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("launcher", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("inflight", sa.Integer(), nullable=False),
        sa.Column("walltime_end", TIME, nullable=True),
        sa.Column("submitted_at", TIME, nullable=False),
        sa.Column("started_at", TIME, nullable=True),
        sa.Column("ready_at", TIME, nullable=True),
        sa.Column("ended_at", TIME, nullable=True),
        sa.Column("updated_at", TIME, nullable=False),
    )
    op.create_index("ix_backend_instances_model", "backend_instances", ["model"])
    op.create_index("ix_backend_instances_state", "backend_instances", ["state"])
    op.create_table(
        "backend_models",
        sa.Column("model", sa.String(200), primary_key=True),
        sa.Column("failed_reason", sa.Text(), nullable=True),
        sa.Column("start_requested_at", TIME, nullable=True),
        sa.Column("stop_requested_at", TIME, nullable=True),
        sa.Column("updated_at", TIME, nullable=False),
    )
    op.create_table(
        "backend_starts",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("seconds", sa.Float(), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_index("ix_backend_starts_model", "backend_starts", ["model"])


def downgrade() -> None:
    op.drop_index("ix_backend_starts_model", "backend_starts")
    op.drop_table("backend_starts")
    op.drop_table("backend_models")
    op.drop_index("ix_backend_instances_state", "backend_instances")
    op.drop_index("ix_backend_instances_model", "backend_instances")
    op.drop_table("backend_instances")
