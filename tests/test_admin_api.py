"""The admin REST API through httpx's ASGI transport, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from lmgate.admin.api import build_admin_app
from lmgate.storage.db import Database
from lmgate.storage.models import UsageRecord
from tests.dbfixtures import backend_fixture, db_fixture, pg_server_fixture  # noqa: F401
from tests.harness import Servers

ADMIN_KEY = "admin-7c1f0e9d"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def client(db: Database) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=build_admin_app(db, ADMIN_KEY))
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as c:
        yield c


def _error(r: httpx.Response, status: int, code: str, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["code"], err["param"]) == (code, param)
    return str(err["message"])


async def test_auth_failures(db: Database) -> None:
    app = build_admin_app(db, ADMIN_KEY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        _error(await c.get("/users"), 401, "invalid_admin_key")
        r = await c.get("/users", headers={"Authorization": "Bearer wrong"})
        _error(r, 401, "invalid_admin_key")
        assert r.json()["error"]["type"] == "authentication_error"
        assert (await c.get("/users", headers=AUTH)).status_code == 200
    closed = httpx.ASGITransport(app=build_admin_app(db, None))
    async with httpx.AsyncClient(transport=closed, base_url="http://t") as c:
        message = _error(await c.get("/users", headers=AUTH), 403, "admin_disabled")
        assert "LMGATE_ADMIN_KEY" in message and "auth.admin_key" in message


async def test_openapi_is_served_and_docs_are_not(client: httpx.AsyncClient) -> None:
    r = await client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    doc = r.json()
    assert doc["openapi"].startswith("3.1.") and doc["info"]["title"] == "lmgate admin API"
    assert {"/users", "/keys", "/keys/{prefix}/revoke", "/usage", "/prices/{model}"} <= set(
        doc["paths"]
    )
    assert "/openapi.json" not in doc["paths"]
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    operations = [op for item in doc["paths"].values() for op in item.values()]
    assert operations and all(op["security"] == [{"HTTPBearer": []}] for op in operations)
    for page in ("/docs", "/redoc"):
        assert (await client.get(page)).status_code == 404


async def test_openapi_needs_the_admin_key(db: Database) -> None:
    app = build_admin_app(db, ADMIN_KEY)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        _error(await c.get("/openapi.json"), 401, "invalid_admin_key")
        r = await c.get("/openapi.json", headers={"Authorization": "Bearer wrong"})
        assert _error(r, 401, "invalid_admin_key") and r.headers["www-authenticate"] == "Bearer"
        assert (await c.get("/openapi.json", headers=AUTH)).json()["paths"]
    closed = httpx.ASGITransport(app=build_admin_app(db, None))
    async with httpx.AsyncClient(transport=closed, base_url="http://t") as c:
        _error(await c.get("/openapi.json", headers=AUTH), 403, "admin_disabled")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_gateway_serves_openapi_only_with_the_admin_key(
    servers: Servers, db: Database
) -> None:
    stub = servers.stub()
    gw = servers.gateway(
        {
            "providers": {"up": {"base_url": stub.url}},
            "models": [{"name": "m1", "provider": "up"}],
            "database": {"url": db.url},
            "auth": {"enabled": True, "admin_key": ADMIN_KEY},
        }
    )
    async with httpx.AsyncClient(base_url=gw.url) as c:
        _error(await c.get("/admin/openapi.json"), 401, "invalid_admin_key")
        r = await c.get("/admin/openapi.json", headers=AUTH)
        assert r.status_code == 200 and r.json()["servers"] == [{"url": "/admin"}]
        assert "/users" in r.json()["paths"]
        for page in ("/admin/docs", "/admin/redoc"):
            assert (await c.get(page)).status_code == 404
            assert (await c.get(page, headers=AUTH)).status_code == 404


async def test_users_and_teams(client: httpx.AsyncClient) -> None:
    assert (await client.post("/teams", json={"name": "ml"})).status_code == 201
    r = await client.post("/users", json={"name": "alice", "email": "a@x.org", "team": "ml"})
    assert r.status_code == 201 and r.json()["team"] == "ml"
    _error(await client.post("/users", json={"name": "alice"}), 409, "conflict", "name")
    _error(await client.post("/users", json={"name": "b", "team": "x"}), 404, "not_found", "team")
    users = (await client.get("/users")).json()
    assert users["object"] == "list" and [u["name"] for u in users["data"]] == ["alice"]
    r = await client.patch("/users/alice", json={"role": "admin", "disabled": True})
    assert (r.json()["role"], r.json()["disabled"], r.json()["team"]) == ("admin", True, "ml")
    assert (await client.patch("/users/alice", json={"team": None})).json()["team"] is None
    assert (await client.get("/users/alice")).json()["email"] == "a@x.org"
    teams = (await client.get("/teams")).json()["data"]
    assert [(t["name"], t["members"]) for t in teams] == [("ml", 0)]
    assert (await client.get("/teams/ml")).json()["users"] == []
    assert (await client.delete("/teams/ml")).status_code == 204
    assert (await client.delete("/users/alice")).status_code == 204
    _error(await client.get("/users/alice"), 404, "not_found", "user")


async def test_validation_errors_use_the_envelope(client: httpx.AsyncClient) -> None:
    message = _error(
        await client.post("/users", json={"name": "a", "role": "x"}), 400, "invalid_value", "role"
    )
    assert message.startswith("role:")
    _error(await client.post("/users", json={}), 400, "invalid_value", "name")
    _error(await client.put("/budgets/user/a", json={"amount": -1}), 400, "invalid_value", "amount")
    _error(await client.get("/usage?by=planet"), 400, "invalid_value", "by")
    _error(await client.get("/usage?since=soon"), 400, "invalid_value", "since")
    r = await client.post("/keys", json={"user": "a", "expires_in": "forever"})
    _error(r, 400, "invalid_value", "expires_in")
    _error(await client.get("/nowhere"), 404, "not_found")
    r = await client.post("/users", content=b"{", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


async def test_keys(client: httpx.AsyncClient) -> None:
    await client.post("/users", json={"name": "alice"})
    body = {
        "user": "alice",
        "name": "laptop",
        "expires_in": "180d",
        "models": ["gpt-4o*"],
        "budget": {"amount": 20, "period": "month"},
    }
    r = await client.post("/keys", json=body)
    assert r.status_code == 201, r.text
    created = r.json()
    secret, prefix = created["key"], created["prefix"]
    assert secret.startswith(prefix) and created["status"] == "active"
    assert "secret_hash" not in created and created["expires_at"] is not None
    listed = (await client.get("/keys", params={"user": "alice"})).json()["data"]
    assert [k["prefix"] for k in listed] == [prefix]
    assert secret not in str(listed) and hashlib.sha256(secret.encode()).hexdigest() not in str(
        listed
    )
    assert "key" not in (await client.get(f"/keys/{prefix}")).json()
    budget = (await client.get(f"/budgets/key/{prefix}")).json()
    assert (budget["amount"], budget["period"], budget["spent"]) == (20.0, "month", 0.0)
    revoked = (await client.post(f"/keys/{prefix}/revoke")).json()
    assert revoked["status"] == "revoked"
    assert (await client.get("/keys")).json()["data"] == []
    assert len((await client.get("/keys?include_revoked=true")).json()["data"]) == 1
    _error(await client.post("/keys/lmg-nope/revoke"), 404, "not_found", "prefix")
    _error(await client.post("/keys", json={"user": "bob"}), 404, "not_found", "user")


async def test_budgets_and_prices(client: httpx.AsyncClient) -> None:
    await client.post("/teams", json={"name": "ml"})
    r = await client.put("/budgets/team/ml", json={"amount": 100, "period": "week"})
    assert r.status_code == 200 and r.json()["resets_at"] is not None
    assert [b["name"] for b in (await client.get("/budgets")).json()["data"]] == ["ml"]
    assert (await client.delete("/budgets/team/ml")).status_code == 204
    _error(await client.get("/budgets/team/ml"), 404, "not_found", "team")
    _error(await client.put("/budgets/planet/x", json={"amount": 1}), 400, "invalid_value", "scope")
    r = await client.put(
        "/prices/openai/gpt-4o", json={"input_per_mtok": 2.5, "output_per_mtok": 10}
    )
    assert r.status_code == 200 and r.json()["model"] == "openai/gpt-4o"
    assert (await client.get("/prices/openai/gpt-4o")).json()["output_per_mtok"] == 10.0
    assert len((await client.get("/prices")).json()["data"]) == 1
    assert (await client.delete("/prices/openai/gpt-4o")).status_code == 204
    _error(await client.get("/prices/openai/gpt-4o"), 404, "not_found", "model")


async def test_usage_json_and_csv(db: Database, client: httpx.AsyncClient) -> None:
    alice = (await client.post("/users", json={"name": "alice"})).json()
    now = datetime.now(UTC)
    async with db.session() as s, s.begin():
        s.add(
            UsageRecord(
                request_id="r1",
                created_at=now,
                user_id=alice["id"],
                model="m",
                status=200,
                prompt_tokens=3,
                completion_tokens=4,
                cached_tokens=0,
                reasoning_tokens=0,
                cost=0.25,
                latency_ms=1.0,
                streamed=False,
                estimated=False,
                cache_hit=False,
            )
        )
    report = (await client.get("/usage", params={"by": "user", "since": "1d"})).json()
    assert report["by"] == "user" and report["until"] is None
    assert [(r["name"], r["requests"], r["cost"]) for r in report["data"]] == [("alice", 1, 0.25)]
    r = await client.get("/usage", params={"by": "model", "since": "2000-01-01", "format": "csv"})
    assert r.headers["content-type"].startswith("text/csv")
    lines = r.text.splitlines()
    assert lines[0].startswith("name,requests,") and lines[1].startswith("m,1,3,4,")
    empty = await client.get("/usage", params={"since": "2000-01-01", "until": "2000-01-02"})
    assert empty.json()["data"] == []


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_mounted_under_admin(db: Database) -> None:
    outer = Starlette(routes=[Mount("/admin", build_admin_app(db, ADMIN_KEY))])
    transport = httpx.ASGITransport(app=outer)
    async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=AUTH) as c:
        doc = (await c.get("/admin/openapi.json")).json()
        assert doc["servers"] == [{"url": "/admin"}]
        _error(
            await c.get("/admin/openapi.json", headers={"Authorization": ""}),
            401,
            "invalid_admin_key",
        )
        assert (await c.post("/admin/teams", json={"name": "ml"})).status_code == 201
        assert [t["name"] for t in (await c.get("/admin/teams")).json()["data"]] == ["ml"]
        _error(
            await c.get("/admin/users", headers={"Authorization": "x"}), 401, "invalid_admin_key"
        )
