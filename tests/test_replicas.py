"""Two gateway processes on one PostgreSQL and one Redis hold every limit globally, share
budgets, and refuse a key revoked through the other within a second."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from lmgate.storage.db import Database
from lmgate.storage.keys import create_key
from lmgate.storage.users import create_user
from tests.dbfixtures import PgServer
from tests.harness import Servers
from tests.test_serve import free_port, serve, wait_ready

MSG = [{"role": "user", "content": "hi"}]
ADMIN = "replica-admin-key"


class Replicas:
    """Two `lmgate serve` processes on the same configuration."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[Any] = []
        self.urls: list[str] = []

    def start(self, config: dict[str, Any]) -> list[str]:
        path = self.tmp_path / "lmgate.yaml"
        path.write_text(yaml.safe_dump(config))
        for _ in range(2):
            port = free_port()
            proc = serve("--config", str(path), "--port", str(port))
            self.procs.append(proc)
            wait_ready(port, proc)
            self.urls.append(f"http://127.0.0.1:{port}")
        return self.urls

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(20)


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[Replicas]:
    r = Replicas(tmp_path)
    yield r
    r.stop()


@pytest.fixture
async def pg_db(pg_server: PgServer) -> Any:
    database = Database(pg_server.url(await pg_server.create(migrated=True)))
    yield database
    await database.close()


def base_config(stub_url: str, db: Database, redis_url: str, **limits: Any) -> dict[str, Any]:
    return {
        "providers": {"up": {"base_url": stub_url}},
        "models": [{"name": "m1", "provider": "up"}],
        "database": {"url": db.url},
        "auth": {"enabled": True, "admin_key": ADMIN, "refresh_interval": 0.2},
        "accounting": {"flush_interval": 0.2, "prices": {"m1": {"input": 0, "output": 1000}}},
        "limits": {"redis_url": redis_url, **limits},
    }


async def spread(urls: list[str], key: str, n: int, parallel: int = 8) -> list[int]:
    """`n` requests, alternating between the replicas, `parallel` at a time."""
    sem = asyncio.Semaphore(parallel)
    async with httpx.AsyncClient(timeout=30) as c:

        async def one(i: int) -> int:
            async with sem:
                r = await c.post(
                    f"{urls[i % len(urls)]}/v1/chat/completions",
                    json={"model": "m1", "messages": MSG, "max_tokens": 10},
                    headers={"authorization": f"Bearer {key}"},
                )
                return r.status_code

        return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_request_limit_is_global(
    servers: Servers, pg_db: Database, redis_url: str, replicas: Replicas
) -> None:
    stub = servers.stub()
    await create_user(pg_db, "ann")
    _, key = await create_key(pg_db, "ann")
    urls = replicas.start(base_config(stub.url, pg_db, redis_url, key={"rpm": 60}))
    codes = await spread(urls, key, 180)
    assert 59 <= codes.count(200) <= 61
    assert codes.count(200) + codes.count(429) == 180
    assert stub.stats.requests == codes.count(200)


async def test_token_limit_is_global(
    servers: Servers, pg_db: Database, redis_url: str, replicas: Replicas
) -> None:
    """11 real tokens a request (see test_limits); admitted with an estimate of 31 (the body's
    size plus max_tokens 10): sequential requests over both replicas stop at 60 ± 1."""
    stub = servers.stub()
    await create_user(pg_db, "ben")
    _, key = await create_key(pg_db, "ben")
    urls = replicas.start(base_config(stub.url, pg_db, redis_url, key={"tpm": 680}))
    codes = await spread(urls, key, 90, parallel=1)
    assert 59 <= codes.count(200) <= 61


async def test_revocation_reaches_the_other_replica(
    servers: Servers, pg_db: Database, redis_url: str, replicas: Replicas
) -> None:
    stub = servers.stub()
    await create_user(pg_db, "cid")
    row, key = await create_key(pg_db, "cid")
    first, second = replicas.start(base_config(stub.url, pg_db, redis_url))
    auth = {"authorization": f"Bearer {key}"}
    body = {"model": "m1", "messages": MSG}
    async with httpx.AsyncClient() as c:
        assert (await c.post(f"{second}/v1/chat/completions", json=body, headers=auth)).is_success
        r = await c.post(
            f"{first}/admin/keys/{row.prefix}/revoke", headers={"authorization": f"Bearer {ADMIN}"}
        )
        assert r.is_success, r.text
        revoked = time.monotonic()
        while (await c.post(f"{second}/v1/chat/completions", json=body, headers=auth)).is_success:
            assert time.monotonic() - revoked < 1.0, "the other replica still accepts the key"
            await asyncio.sleep(0.02)


async def test_budget_is_shared(
    servers: Servers, pg_db: Database, redis_url: str, replicas: Replicas
) -> None:
    """$1,000/M output tokens: a 7-word reply costs $0.007, a request reserves $0.010 (its
    max_tokens). A $0.07 budget has room for 10 replies, over both replicas together."""
    stub = servers.stub(delay=0.05)
    await create_user(pg_db, "dee")
    _, key = await create_key(pg_db, "dee", budget=(0.07, "month"))
    urls = replicas.start(base_config(stub.url, pg_db, redis_url))
    codes = await spread(urls, key, 40)
    assert 7 <= codes.count(200) <= 11
    assert stub.stats.requests == codes.count(200)
    assert codes.count(200) * 0.007 <= 0.07 + 0.010 + 1e-9


async def test_deployment_max_inflight_is_global(
    servers: Servers, pg_db: Database, redis_url: str, replicas: Replicas
) -> None:
    """A small vLLM behind `max_inflight: 2`: 12 requests at once over both replicas, the
    upstream never sees more than 2 at a time; the rest get 429 `deployment_busy`, and the
    slots are free again once the answers are in."""
    stub = servers.stub(delay=0.6)
    await create_user(pg_db, "eve")
    _, key = await create_key(pg_db, "eve")
    config = base_config(stub.url, pg_db, redis_url)
    config["models"] = [{"name": "m1", "deployments": [{"provider": "up", "max_inflight": 2}]}]
    config["routing"] = {"retries": 0}
    urls = replicas.start(config)
    auth = {"authorization": f"Bearer {key}"}
    body = {"model": "m1", "messages": MSG, "max_tokens": 5}
    async with httpx.AsyncClient(timeout=30) as c:

        async def one(i: int) -> httpx.Response:
            return await c.post(f"{urls[i % 2]}/v1/chat/completions", json=body, headers=auth)

        answers = await asyncio.gather(*(one(i) for i in range(12)))
        codes = [r.status_code for r in answers]
        assert stub.stats.max_inflight == 2
        assert codes.count(200) >= 2 and codes.count(200) + codes.count(429) == 12
        busy = next(r for r in answers if r.status_code == 429)
        assert busy.json()["error"]["code"] == "deployment_busy"
        assert busy.headers["retry-after"] == "1"
        again = await asyncio.gather(one(0), one(1))
        assert [r.status_code for r in again] == [200, 200]
