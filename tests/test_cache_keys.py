"""Cache keys: the normalised request, the fields that count, and the deterministic policy;
the request headers that steer the cache."""

from __future__ import annotations

from typing import Any

import pytest

from lmgate.api.errors import GatewayError
from lmgate.cache.keys import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    IGNORED_FIELDS,
    Policy,
    cache_key,
    request_policy,
)

BASE: dict[str, Any] = {
    "model": "m1",
    "messages": [{"role": "user", "content": "hi"}],
    "temperature": 0,
}


def key(data: dict[str, Any], scope: str = "k1", kind: str = CHAT, **kw: Any) -> str | None:
    return cache_key(kind, data, scope, **kw)


def test_key_ignores_order_of_fields_at_every_level() -> None:
    shuffled = {
        "temperature": 0,
        "messages": [{"content": "hi", "role": "user"}],
        "model": "m1",
    }
    assert key(BASE) == key(shuffled) is not None


@pytest.mark.parametrize("field", sorted(IGNORED_FIELDS))
def test_fields_that_do_not_change_the_answer_are_left_out(field: str) -> None:
    assert key({**BASE, field: {"x": 1}}) == key(BASE)


def test_null_counts_as_absent() -> None:
    assert key({**BASE, "max_tokens": None, "tools": None}) == key(BASE)


def test_stream_and_non_stream_share_a_key() -> None:
    streamed = {**BASE, "stream": True, "stream_options": {"include_usage": True}}
    assert key(streamed) == key(BASE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("model", "m2"),
        ("messages", [{"role": "user", "content": "hello"}]),
        ("temperature", 0.0001),
        ("top_p", 0.5),
        ("max_tokens", 5),
        ("max_completion_tokens", 5),
        ("seed", 7),
        ("n", 2),
        ("stop", ["\n"]),
        ("logit_bias", {"50256": -100}),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("tool_choice", "required"),
        ("response_format", {"type": "json_object"}),
        ("logprobs", True),
        ("top_k", 5),  # a provider's own parameter: unknown fields count
        ("stub", {"content": "x"}),
    ],
)
def test_fields_that_change_the_answer_are_in_the_key(field: str, value: Any) -> None:
    assert key({**BASE, field: value}) != key(BASE)


def test_scope_and_endpoint_are_in_the_key() -> None:
    assert key(BASE, "k1") != key(BASE, "k2")
    assert (k := key(BASE, "t3")) is not None and k.startswith("t3:")
    prompt = {"model": "m1", "prompt": "hi", "temperature": 0}
    assert key(prompt, kind=COMPLETIONS) != key(prompt, kind=CHAT)


@pytest.mark.parametrize(
    "params",
    [{"temperature": 0}, {"temperature": 0.0}, {"seed": 1}, {"temperature": 0.7, "seed": 0}],
)
def test_deterministic_requests_are_cached(params: dict[str, Any]) -> None:
    data = {"model": "m1", "messages": BASE["messages"], **params}
    assert key(data) is not None
    assert key({"model": "m1", "prompt": "x", **params}, kind=COMPLETIONS) is not None


@pytest.mark.parametrize(
    "params",
    [{}, {"temperature": 1}, {"temperature": False}, {"seed": "1"}, {"seed": True}, {"seed": None}],
)
def test_other_requests_are_not_cached_by_default(params: dict[str, Any]) -> None:
    data = {"model": "m1", "messages": BASE["messages"], **params}
    assert key(data) is None
    assert key(data, only_deterministic=False) is not None


def test_embeddings_are_always_deterministic() -> None:
    assert key({"model": "e", "input": "hi"}, kind=EMBEDDINGS) is not None


def test_uncached_endpoints_and_audio_output() -> None:
    assert key(BASE, kind="/images/generations") is None
    assert key({**BASE, "modalities": ["audio"], "audio": {"voice": "x"}}) is None


def test_request_policy_defaults() -> None:
    assert request_policy(None, None) == Policy(True, True, None)


@pytest.mark.parametrize(
    ("cache_control", "expected"),
    [
        (b"no-cache", Policy(False, True, None)),
        ("No-Cache", Policy(False, True, None)),
        (b"no-store", Policy(False, False, None)),
        (b"max-age=0, no-store", Policy(False, False, None)),
        (b"no-cache, no-store", Policy(False, False, None)),
        (b"max-age=60", Policy(True, True, None)),
    ],
)
def test_cache_control(cache_control: bytes | str, expected: Policy) -> None:
    assert request_policy(cache_control, None) == expected


def test_ttl_header() -> None:
    assert request_policy(None, b"60") == Policy(True, True, 60)
    assert request_policy(None, " 5 ") == Policy(True, True, 5)
    assert request_policy(None, b"0") == Policy(True, False, 0)
    assert request_policy(b"no-cache", b"10") == Policy(False, True, 10)


@pytest.mark.parametrize("bad", [b"", b"-1", b"1.5", b"soon", b"99999999999", "١٢"])
def test_invalid_ttl_is_a_client_error(bad: bytes | str) -> None:
    with pytest.raises(GatewayError) as e:
        request_policy(None, bad)
    assert e.value.status == 400 and e.value.code == "invalid_cache_ttl"
