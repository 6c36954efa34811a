"""Per-model prices set by administrators; they override the shipped and configured tables."""

from __future__ import annotations

from sqlalchemy import select

from lmgate.storage.db import Database
from lmgate.storage.errors import InvalidError, NotFoundError
from lmgate.storage.models import Price
from lmgate.storage.timeutil import utcnow


async def set_price(
    db: Database,
    model: str,
    input_per_mtok: float,
    output_per_mtok: float,
    cached_input_per_mtok: float | None = None,
) -> Price:
    """Create or replace a model's price, in US dollars per million tokens."""
    for field, value in (
        ("input_per_mtok", input_per_mtok),
        ("output_per_mtok", output_per_mtok),
        ("cached_input_per_mtok", cached_input_per_mtok),
    ):
        if value is not None and not value >= 0:
            raise InvalidError(f"{field} must be zero or more", field)
    if not model.strip():
        raise InvalidError("the model name is empty", "model")
    async with db.session() as s, s.begin():
        price = await s.get(Price, model)
        if price is None:
            price = Price(model=model)
            s.add(price)
        price.input_per_mtok = input_per_mtok
        price.output_per_mtok = output_per_mtok
        price.cached_input_per_mtok = cached_input_per_mtok
        price.updated_at = utcnow()
    return price


async def get_price(db: Database, model: str) -> Price:
    """A model's price override; NotFoundError if it has none."""
    async with db.session() as s:
        price = await s.get(Price, model)
    if price is None:
        raise NotFoundError(f"no price set for model {model!r}", "model")
    return price


async def list_prices(db: Database) -> list[Price]:
    """Every price override, by model name."""
    async with db.session() as s:
        return list(await s.scalars(select(Price).order_by(Price.model)))


async def delete_price(db: Database, model: str) -> None:
    """Remove a model's price override."""
    async with db.session() as s, s.begin():
        price = await s.get(Price, model)
        if price is None:
            raise NotFoundError(f"no price set for model {model!r}", "model")
        await s.delete(price)
