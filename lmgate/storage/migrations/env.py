"""Alembic's environment: migrations run on the connection `Database.upgrade` passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

import lmgate.backends.models  # noqa: F401  (the managed backends' tables)
from lmgate.storage.models import Base


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


conn = context.config.attributes.get("connection")
if not isinstance(conn, Connection):
    raise RuntimeError("lmgate's migrations run through lmgate.storage.db.Database.upgrade()")
_run(conn)
