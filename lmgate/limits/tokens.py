"""The token estimate a request is admitted with, before its real count is known."""

from __future__ import annotations

from lmgate.accounting.tokenizer import estimate_prompt_tokens
from lmgate.api.relay import Payload


def estimate_request_tokens(payload: Payload) -> int:
    """The prompt's tokens estimated from its size, plus the completion tokens it asks for."""
    data = payload.data or {}
    max_out = data.get("max_completion_tokens") or data.get("max_tokens")
    out = max_out if isinstance(max_out, int) and max_out > 0 else 0
    return estimate_prompt_tokens(len(payload.raw or b"")) + out
