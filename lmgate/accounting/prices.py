"""Model prices: the shipped table, overridden by the configuration, then by the database."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import yaml
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from lmgate.accounting.usage import Usage
from lmgate.config.schema import PriceConfig
from lmgate.storage.models import Price

_VERSION_SUFFIX = re.compile(r"(@.+|-\d{4}-\d{2}-\d{2}|-\d{8}|-\d{4}|-latest)$")
"""`gpt-4o-2024-08-06`, `claude-3-5-sonnet-20241022`, `mistral-large-2411`, `…-latest`, `…@v2`."""
_PER_TOKEN = 1e-6
log = logging.getLogger("lmgate.prices")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """US dollars per million tokens."""

    input: float
    output: float
    cached_input: float | None = None


@cache
def shipped_prices() -> dict[str, ModelPrice]:
    """The price table shipped with lmgate (`prices.yaml`)."""
    text = files("lmgate.accounting").joinpath("prices.yaml").read_text("utf-8")
    return {name: ModelPrice(**fields) for name, fields in yaml.safe_load(text).items()}


async def load_overrides(engine: AsyncEngine) -> dict[str, ModelPrice]:
    """Prices set through the admin API (the `prices` table)."""
    async with engine.connect() as conn:
        return await _read_overrides(conn)


async def _read_overrides(conn: AsyncConnection) -> dict[str, ModelPrice]:
    rows = await conn.execute(select(Price.__table__))
    return {
        r.model: ModelPrice(r.input_per_mtok, r.output_per_mtok, r.cached_input_per_mtok)
        for r in rows
    }


def _candidates(name: str) -> Iterable[str]:
    yield name
    bare = name.rpartition("/")[2]
    if bare != name:
        yield bare
    for n in (name, bare):
        undated = _VERSION_SUFFIX.sub("", n)
        if undated != n:
            yield undated


class PriceBook:
    """Looks up a request's price by its public model name, then by the upstream's name.

    Each name is tried as given, without a `provider/` prefix, then without a date or version
    suffix. Lookups are memoised: they run once per request.
    """

    def __init__(
        self,
        config: Mapping[str, PriceConfig] | None = None,
        db: Mapping[str, ModelPrice] | None = None,
    ) -> None:
        items = (config or {}).items()
        self._config = {n: ModelPrice(c.input, c.output, c.cached_input) for n, c in items}
        self._table: dict[str, ModelPrice] = {}
        self._memo: dict[tuple[str, str | None], ModelPrice | None] = {}
        self.set_overrides(db or {})

    def set_overrides(self, db: Mapping[str, ModelPrice]) -> None:
        """Replace the database's prices (after an admin change or a reload)."""
        self._table = {**shipped_prices(), **self._config, **db}
        self._memo = {}

    def price(self, model: str, upstream_model: str | None = None) -> ModelPrice | None:
        """The price of `model` (served as `upstream_model`), or None when unpriced."""
        key = (model, upstream_model)
        try:
            return self._memo[key]
        except KeyError:
            pass
        found = self._find(model)
        if found is None and upstream_model:
            found = self._find(upstream_model)
        self._memo[key] = found
        return found

    def _find(self, name: str) -> ModelPrice | None:
        for candidate in _candidates(name):
            p = self._table.get(candidate)
            if p is not None:
                return p
        return None

    def cost(self, model: str, upstream_model: str | None, usage: Usage) -> tuple[float, bool]:
        """(US dollars, priced?): cached prompt tokens at the cached price, the rest at input."""
        p = self.price(model, upstream_model)
        if p is None:
            return 0.0, False
        cached = min(usage.cached, usage.prompt)
        cached_rate = p.input if p.cached_input is None else p.cached_input
        usd = (
            (usage.prompt - cached) * p.input + cached * cached_rate + usage.completion * p.output
        ) * _PER_TOKEN
        return usd, True

    def unpriced(self, models: Iterable[str | tuple[str, str | None]]) -> list[str]:
        """The models that have no price (for `lmgate doctor`), each named once: public
        names, or (public name, upstream name) pairs, one per deployment."""
        out: list[str] = []
        for m in models:
            name, upstream = (m, None) if isinstance(m, str) else m
            if name not in out and self.price(name, upstream) is None:
                out.append(name)
        return out


class DatabasePrices:
    """Keeps a PriceBook's database prices equal to the `prices` table, in every gateway.

    Each poll reads only the table's row count and newest `updated_at`: setting a price
    changes the second, removing one the first. The prices are read again only then.
    """

    def __init__(self, book: PriceBook, engine: AsyncEngine) -> None:
        self.book = book
        self.engine = engine
        self._version: tuple[object, ...] | None = None
        self._failing = False

    async def refresh(self) -> bool:
        """Reload the prices if the table changed since the last call; True if it did."""
        version_query = select(func.count(), func.max(Price.updated_at)).select_from(Price)
        async with self.engine.connect() as conn:
            version = tuple((await conn.execute(version_query)).one())
            if version == self._version:
                return False
            # A change landing between the two reads is read now and again at the next poll.
            overrides = await _read_overrides(conn)
        self.book.set_overrides(overrides)
        self._version = version
        return True

    async def follow(self, interval: float) -> None:
        """Refresh every `interval` seconds, for ever; while the database is down, the prices
        already loaded stay in force."""
        while True:
            await asyncio.sleep(interval)
            try:
                if await self.refresh():
                    log.info("prices reloaded from the database")
                self._failing = False
            except Exception as e:
                if not self._failing:
                    log.warning("could not reload prices: %s", type(e).__name__)
                self._failing = True
