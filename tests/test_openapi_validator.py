"""The OpenAPI validator accepts OpenAI-shaped bodies and rejects malformed ones."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.infra.openapi import validate

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
CHAT = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "stub-model",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": USAGE,
}
CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1_700_000_000,
    "model": "stub-model",
    "choices": [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "He"},
            "finish_reason": None,
            "logprobs": None,
        }
    ],
    "usage": None,
}
LAST_CHUNK = {**CHUNK, "choices": [], "usage": USAGE}
COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1_700_000_000,
    "model": "stub-model",
    "choices": [{"index": 0, "text": "Hello!", "finish_reason": "length", "logprobs": None}],
    "usage": USAGE,
}
EMBEDDINGS = {
    "object": "list",
    "model": "stub-embed",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.25, -0.5, 1.0]}],
    "usage": {"prompt_tokens": 2, "total_tokens": 2},
}
MODEL = {"id": "stub-model", "object": "model", "created": 0, "owned_by": "lmgate"}
MODELS = {"object": "list", "data": [MODEL]}
ERROR = {
    "message": "no such model",
    "type": "invalid_request_error",
    "param": "model",
    "code": None,
}

GOOD = [
    ("CreateChatCompletionResponse", CHAT),
    ("CreateChatCompletionStreamResponse", CHUNK),
    ("CreateChatCompletionStreamResponse", LAST_CHUNK),
    ("CreateCompletionResponse", COMPLETION),
    ("CreateEmbeddingResponse", EMBEDDINGS),
    ("ListModelsResponse", MODELS),
    ("ListModelsResponse", {"object": "list", "data": []}),
    ("Model", MODEL),
    ("ErrorResponse", {"error": ERROR}),
    ("Error", {**ERROR, "param": None}),
]


def _edit(document: dict[str, Any], path: str, value: object = ...) -> dict[str, Any]:
    """A deep copy of ``document`` with ``path`` (dotted; digits index lists) set or deleted."""
    edited = copy.deepcopy(document)
    *parents, last = path.split(".")
    node: Any = edited
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is ...:
        del node[last]
    else:
        node[last] = value
    return edited


# (schema, instance, a fragment of the expected message)
BAD = [
    ("CreateChatCompletionResponse", _edit(CHAT, "choices"), "'choices' is a required property"),
    ("CreateChatCompletionResponse", _edit(CHAT, "object", "chat.completion.chunk"), "$.object"),
    ("CreateChatCompletionResponse", _edit(CHAT, "choices.0.finish_reason", None), "finish_reason"),
    (
        "CreateChatCompletionResponse",
        _edit(CHAT, "usage.total_tokens", "5"),
        "$.usage.total_tokens",
    ),
    ("CreateChatCompletionResponse", _edit(CHAT, "choices.0.message.role", "user"), "$.choices[0]"),
    ("CreateChatCompletionStreamResponse", _edit(CHUNK, "object", "chat.completion"), "$.object"),
    (
        "CreateChatCompletionStreamResponse",
        _edit(CHUNK, "choices.0.delta"),
        "'delta' is a required",
    ),
    ("CreateChatCompletionStreamResponse", _edit(CHUNK, "choices.0.finish_reason", "done"), "done"),
    ("CreateChatCompletionStreamResponse", _edit(LAST_CHUNK, "usage.prompt_tokens"), "$.usage"),
    ("CreateCompletionResponse", _edit(COMPLETION, "object", "chat.completion"), "$.object"),
    ("CreateCompletionResponse", _edit(COMPLETION, "choices.0.text"), "'text' is a required"),
    ("CreateEmbeddingResponse", _edit(EMBEDDINGS, "data.0.embedding", ["x"]), "embedding[0]"),
    ("CreateEmbeddingResponse", _edit(EMBEDDINGS, "usage"), "'usage' is a required property"),
    ("ListModelsResponse", _edit(MODELS, "object", "models"), "$.object"),
    ("ListModelsResponse", _edit(MODELS, "data.0.owned_by"), "$.data[0]"),
    ("Model", _edit(MODEL, "created", "yesterday"), "$.created"),
    ("ErrorResponse", {"error": "no such model"}, "$.error"),
    ("ErrorResponse", {"detail": ERROR}, "'error' is a required property"),
    ("Error", _edit(ERROR, "message", 404), "$.message"),
]

# Requirements of the spec that an implementation can easily miss.
STRICTER_THAN_EXPECTED = [
    pytest.param(
        "CreateChatCompletionResponse",
        _edit(CHAT, "choices.0.message.refusal"),
        id="chat-message-without-refusal",
    ),
    pytest.param(
        "CreateChatCompletionResponse",
        _edit(CHAT, "choices.0.logprobs"),
        id="chat-choice-without-logprobs",
    ),
    pytest.param("CreateChatCompletionResponse", _edit(CHAT, "usage", None), id="chat-usage-null"),
    pytest.param(
        "CreateCompletionResponse",
        _edit(COMPLETION, "choices.0.finish_reason", None),
        id="completion-chunk-finish-reason-null",
    ),
    pytest.param(
        "CreateEmbeddingResponse",
        _edit(EMBEDDINGS, "data.0.embedding", "AACAPg=="),
        id="embedding-base64",
    ),
    pytest.param("Error", _edit(ERROR, "code"), id="error-without-code"),
]


@pytest.mark.parametrize(("schema", "instance"), GOOD)
def test_accepts_valid(schema: str, instance: object) -> None:
    validate(schema, instance)


@pytest.mark.parametrize(("schema", "instance", "expected"), BAD)
def test_rejects_invalid(schema: str, instance: object, expected: str) -> None:
    with pytest.raises(AssertionError, match=f"does not match {schema}") as failure:
        validate(schema, instance)
    assert expected in str(failure.value)


@pytest.mark.parametrize(("schema", "instance"), STRICTER_THAN_EXPECTED)
def test_spec_requirements_easy_to_miss(schema: str, instance: object) -> None:
    with pytest.raises(AssertionError):
        validate(schema, instance)


def test_unknown_schema_is_an_error() -> None:
    with pytest.raises(KeyError, match="NoSuchSchema"):
        validate("NoSuchSchema", {})
