"""The price book: shipped table, overrides, name fallbacks, cost arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import create_async_engine

from lmgate.accounting.prices import ModelPrice, PriceBook, load_overrides, shipped_prices
from lmgate.accounting.usage import Usage
from lmgate.config.schema import PriceConfig
from lmgate.storage.models import Base, Price


def test_shipped_table_covers_common_models() -> None:
    table = shipped_prices()
    for name in ("gpt-4o", "gpt-4.1-nano", "o4-mini", "text-embedding-3-small", "claude-opus-4"):
        assert name in table
    assert table["gpt-4o"] == ModelPrice(2.5, 10.0, 1.25)
    assert all(p.input >= 0 and p.output >= 0 for p in table.values())


def test_cost_with_cached_tokens() -> None:
    book = PriceBook()
    usd, priced = book.cost("gpt-4o", None, Usage(prompt=1_000_000, completion=500_000))
    assert priced and usd == pytest.approx(2.5 + 5.0)
    # 400k cached at 1.25, 600k at 2.50, 100k out at 10
    usd, _ = book.cost("gpt-4o", None, Usage(1_000_000, 100_000, cached=400_000))
    assert usd == pytest.approx(0.5 + 1.5 + 1.0)
    # no cached price: cached tokens cost the input price
    usd, _ = book.cost("gpt-3.5-turbo", None, Usage(1_000_000, 0, cached=1_000_000))
    assert usd == pytest.approx(0.5)
    # reasoning tokens are part of the completion tokens: not billed twice
    usd, _ = book.cost("o1", None, Usage(0, 1000, reasoning=800))
    assert usd == pytest.approx(0.06)


def test_embeddings_bill_input_only() -> None:
    usd, priced = PriceBook().cost("text-embedding-3-large", None, Usage(2_000_000, 0))
    assert priced and usd == pytest.approx(0.26)


def test_name_fallbacks() -> None:
    book = PriceBook()
    gpt4o = shipped_prices()["gpt-4o"]
    assert book.price("gpt-4o-2024-08-06") == gpt4o
    assert book.price("openai/gpt-4o") == gpt4o
    assert book.price("azure/gpt-4o-2024-11-20") == gpt4o
    assert book.price("claude-3-5-sonnet-20241022") == shipped_prices()["claude-3-5-sonnet"]
    assert book.price("mistral-large-latest") == shipped_prices()["mistral-large"]
    assert book.price("mistral-large-2411") == shipped_prices()["mistral-large"]
    # the public name first, then the upstream's
    assert book.price("my-alias", "gpt-4o-mini") == shipped_prices()["gpt-4o-mini"]
    assert book.price("gpt-4.1", "gpt-4o-mini") == shipped_prices()["gpt-4.1"]
    assert book.price("my-alias") is None
    assert book.cost("my-alias", "local/llama", Usage(10, 10)) == (0.0, False)


def test_overrides() -> None:
    config = {"gpt-4o": PriceConfig(input=1, output=2), "local-llm": PriceConfig(input=0.1)}
    book = PriceBook(config)
    assert book.price("gpt-4o") == ModelPrice(1.0, 2.0, None)
    assert book.price("local-llm") == ModelPrice(0.1, 0.0, None)
    book.set_overrides({"gpt-4o": ModelPrice(3.0, 4.0, 0.3)})
    assert book.price("gpt-4o") == ModelPrice(3.0, 4.0, 0.3)  # memo cleared
    assert book.price("local-llm") == ModelPrice(0.1, 0.0, None)
    usd, _ = book.cost("gpt-4o", None, Usage(1_000_000, 0, cached=1_000_000))
    assert usd == pytest.approx(0.3)


def test_unpriced() -> None:
    book = PriceBook({"mine": PriceConfig(input=1)})
    assert book.unpriced(["gpt-4o", "mine", "vllm/qwen", "openai/o3-mini"]) == ["vllm/qwen"]


async def test_load_overrides(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path}/p.db")
    async with engine.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
        await conn.execute(
            insert(Price),
            [
                {
                    "model": "gpt-4o",
                    "input_per_mtok": 9.0,
                    "output_per_mtok": 19.0,
                    "cached_input_per_mtok": None,
                    "updated_at": datetime.now(UTC),
                }
            ],
        )
    overrides = await load_overrides(engine)
    await engine.dispose()
    assert overrides == {"gpt-4o": ModelPrice(9.0, 19.0, None)}
    book = PriceBook({"gpt-4o": PriceConfig(input=1, output=1)}, overrides)
    assert book.price("gpt-4o-2024-05-13") == ModelPrice(9.0, 19.0, None)
