"""Prices set or removed through the admin API apply to running gateways within seconds:
two gateways on one database (SQLite and PostgreSQL), one of them taking the admin calls."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx

from lmgate.accounting.prices import shipped_prices
from lmgate.storage.db import Database
from lmgate.storage.keys import create_key
from lmgate.storage.users import create_user
from tests.harness import RunningGateway, Servers

ADMIN = "admin-secret-for-prices"
MODEL = "gpt-4o-mini"  # priced by the shipped table
WITHIN = 3.5
"""Seconds a price change may take to apply: the gateways check the table every 2 s."""


def _config(stub_url: str, db: Database) -> dict[str, Any]:
    return {
        "providers": {"up": {"base_url": stub_url}},
        "models": [{"name": MODEL, "provider": "up"}],
        "database": {"url": db.url},
        "auth": {"enabled": True, "admin_key": ADMIN},
        "accounting": {"enabled": True},
    }


async def _cost_and_expected(
    http: httpx.AsyncClient, gw: RunningGateway, key: str, rates: tuple[float, float]
) -> tuple[float, float]:
    """The `x-lmgate-cost` of one request, and its cost at `rates` (input, output per Mtok)."""
    r = await http.post(
        f"{gw.base_url}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    expected = (usage["prompt_tokens"] * rates[0] + usage["completion_tokens"] * rates[1]) / 1e6
    return float(r.headers["x-lmgate-cost"]), expected


async def _until_priced(
    http: httpx.AsyncClient, gateways: list[RunningGateway], key: str, rates: tuple[float, float]
) -> float:
    """Seconds until every gateway charges `rates`."""
    started = time.monotonic()
    for gw in gateways:
        while True:
            cost, expected = await _cost_and_expected(http, gw, key, rates)
            if abs(cost - expected) < 1e-8:
                break
            assert time.monotonic() - started < WITHIN, f"{gw.url} charges {cost}, not {expected}"
            await asyncio.sleep(0.1)
    return time.monotonic() - started


async def test_admin_prices_apply_to_running_gateways(servers: Servers, db: Database) -> None:
    stub = servers.stub()
    await create_user(db, "alice")
    _, key = await create_key(db, "alice")
    first = servers.gateway(_config(stub.url, db))
    second = servers.gateway(_config(stub.url, db))  # never sees the admin calls
    both = [first, second]
    shipped = shipped_prices()[MODEL]
    list_price = (shipped.input, shipped.output)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with httpx.AsyncClient(timeout=10) as http:
        for gw in both:
            cost, expected = await _cost_and_expected(http, gw, key, list_price)
            assert cost > 0 and abs(cost - expected) < 1e-8

        r = await http.put(
            f"{first.url}/admin/prices/{MODEL}",
            json={"input_per_mtok": 7.0, "output_per_mtok": 50.0},
            headers=admin,
        )
        assert r.status_code == 200, r.text
        assert await _until_priced(http, both, key, (7.0, 50.0)) < WITHIN

        r = await http.put(
            f"{first.url}/admin/prices/{MODEL}",
            json={"input_per_mtok": 9.0, "output_per_mtok": 60.0},
            headers=admin,
        )
        assert r.status_code == 200, r.text
        assert await _until_priced(http, both, key, (9.0, 60.0)) < WITHIN

        r = await http.delete(f"{first.url}/admin/prices/{MODEL}", headers=admin)
        assert r.status_code == 204, r.text
        assert await _until_priced(http, both, key, list_price) < WITHIN
