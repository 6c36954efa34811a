"""`lmgate db|users|teams|keys|budgets|usage` end to end on a real database."""

from __future__ import annotations

import asyncio
import hashlib
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from lmgate.cli import app
from lmgate.storage.db import Database
from lmgate.storage.models import UsageRecord
from tests.dbfixtures import PgServer, backend_fixture, pg_server_fixture  # noqa: F401

runner = CliRunner(env={"COLUMNS": "200"})


@pytest.fixture
def config(backend: PgServer | None, tmp_path: Path) -> Path:
    """A configuration file naming a new, empty database."""
    if backend is None:
        url = f"sqlite+aiosqlite:///{tmp_path}/cli.db"
    else:
        url = backend.url(asyncio.run(backend.create()))
    path = tmp_path / "lmgate.yaml"
    path.write_text(f"database:\n  url: '{url}'\n")
    return path


def lmgate(config: Path, *args: str, status: int = 0) -> Result:
    result = runner.invoke(app, [*args, "--config", str(config)])
    assert result.exit_code == status, (result.output, result.exception)
    return result


def test_users_keys_budgets_usage(config: Path) -> None:
    assert "up to date" in lmgate(config, "db", "upgrade").output
    lmgate(config, "teams", "add", "ml")
    out = lmgate(config, "users", "add", "alice", "--email", "a@x.org", "--team", "ml").output
    assert "created user alice in team ml" in out
    assert "alice" in lmgate(config, "users", "list").output
    assert re.search(r"ml\s.*\s1\s", lmgate(config, "teams", "list").output)
    created = lmgate(
        config,
        "keys",
        "create",
        "--user",
        "alice",
        "--name",
        "laptop",
        "--budget",
        "20",
        "--period",
        "month",
        "--expires",
        "180d",
        "--models",
        "gpt-4o*,llama-*",
    )
    secret = re.search(r"lmg-[A-Za-z0-9_-]{40}", created.output)
    assert secret is not None
    assert "not be shown again" in created.stderr
    prefix = secret.group()[:12]
    listed = lmgate(config, "keys", "list", "--user", "alice").output
    assert prefix in listed and secret.group() not in listed
    assert hashlib.sha256(secret.group().encode()).hexdigest() not in listed
    assert "gpt-4o*,llama-*" in listed
    lmgate(config, "budgets", "set", "--team", "ml", "--amount", "100", "--period", "week")
    budgets = lmgate(config, "budgets", "list").output
    assert "100.00" in budgets and prefix in budgets
    assert f"revoked key {prefix}" in lmgate(config, "keys", "revoke", prefix).output
    assert prefix not in lmgate(config, "keys", "list").output
    assert "revoked" in lmgate(config, "keys", "list", "--all").output
    _add_usage(config)
    csv = lmgate(config, "usage", "--by", "user", "--since", "30d", "--csv").output
    assert csv.splitlines()[0].startswith("name,requests,")
    assert csv.splitlines()[1].startswith("alice,1,3,4,")
    table = lmgate(config, "usage", "--by", "key", "--since", "2000-01-01").output
    assert f"{prefix} (laptop)" in table


def _add_usage(config: Path) -> None:
    url = config.read_text().split("'")[1]

    async def add() -> None:
        db = Database(url)
        async with db.session() as s, s.begin():
            s.add(
                UsageRecord(
                    request_id="r1",
                    created_at=datetime.now(UTC),
                    user_id=1,
                    key_id=1,
                    model="m",
                    status=200,
                    prompt_tokens=3,
                    completion_tokens=4,
                    cached_tokens=0,
                    reasoning_tokens=0,
                    cost=0.5,
                    latency_ms=1.0,
                    streamed=False,
                    estimated=False,
                    cache_hit=False,
                )
            )
        await db.close()

    asyncio.run(add())


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_errors_are_one_line_messages(config: Path) -> None:
    err = lmgate(config, "users", "add", "bob", "--team", "nope", status=1).stderr
    assert err == "error: no team named 'nope': create it first\n"
    lmgate(config, "users", "add", "bob")
    assert "already exists" in lmgate(config, "users", "add", "bob", status=1).stderr
    assert "no key" in lmgate(config, "keys", "revoke", "lmg-nothing", status=1).stderr
    bad = lmgate(config, "keys", "create", "--user", "bob", "--expires", "soon", status=1)
    assert "invalid duration" in bad.stderr
    assert "exactly one" in lmgate(config, "budgets", "set", "--amount", "1", status=2).stderr
    assert "--by" in lmgate(config, "usage", "--by", "planet", status=2).stderr


def test_default_database_is_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["users", "add", "carol"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lmgate.db").exists()
