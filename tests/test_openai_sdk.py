"""The official `openai` SDK and LangChain against the gateway; every answer checked
against OpenAI's published schemas."""

from __future__ import annotations

import httpx
import openai
import orjson
import pytest

from tests.harness import Servers, one_model
from tests.infra.openapi import validate

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]


@pytest.fixture
def base_url(servers: Servers) -> str:
    stub = servers.stub(chunk_delay=0.001)
    config = one_model(stub.url, upstream="stub-model")
    config["models"][0]["aliases"] = ["m1-alias"]
    config["models"].append({"name": "emb", "provider": "up"})
    return servers.gateway(config).base_url


@pytest.fixture
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)


def dump(obj: object) -> object:
    return obj.model_dump(mode="json", exclude_unset=True)  # type: ignore[attr-defined]


def test_chat_sync(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="m1", messages=MESSAGES)
    body = orjson.loads(raw.content)
    validate("CreateChatCompletionResponse", body)
    completion = raw.parse()
    assert completion.choices[0].message.content.endswith("hello there")
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert raw.headers["x-request-id"]


def test_chat_stream_sync(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="m1-alias", messages=MESSAGES, stream=True)
    text = ""
    for chunk in stream:
        validate("CreateChatCompletionStreamResponse", dump(chunk))
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text.endswith("hello there")


def test_raw_stream_chunks_validate_and_end_with_done(base_url: str) -> None:
    body = {
        "model": "m1",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = []
    with httpx.stream("POST", f"{base_url}/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", c)
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_chat_async_and_stream(base_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    completion = await client.chat.completions.create(model="m1", messages=MESSAGES)
    validate("CreateChatCompletionResponse", dump(completion))
    stream = await client.chat.completions.create(
        model="m1", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    usage = None
    async for chunk in stream:
        validate("CreateChatCompletionStreamResponse", dump(chunk))
        usage = chunk.usage or usage
    assert usage is not None and usage.total_tokens > 0
    await client.close()


def test_completions(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(model="m1", prompt="say something")
    validate("CreateCompletionResponse", orjson.loads(raw.content))
    stream = client.completions.create(model="m1", prompt="say something", stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text.endswith("say something")


async def test_completions_async(base_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    result = await client.completions.create(model="m1", prompt=["a b", "c"])
    validate("CreateCompletionResponse", dump(result))
    await client.close()


def test_embeddings(client: openai.OpenAI) -> None:
    # The SDK asks for base64 by default and decodes it; ask for floats too.
    result = client.embeddings.create(model="emb", input=["one", "two"])
    assert len(result.data) == 2 and len(result.data[0].embedding) == 8
    raw = client.embeddings.with_raw_response.create(
        model="emb", input="one", encoding_format="float"
    )
    body = orjson.loads(raw.content)
    validate("CreateEmbeddingResponse", body)
    assert body["data"][0]["embedding"] == pytest.approx(result.data[0].embedding, rel=1e-6)


async def test_embeddings_async(base_url: str) -> None:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    result = await client.embeddings.create(model="emb", input="one", dimensions=4)
    assert len(result.data[0].embedding) == 4
    await client.close()


def test_models(client: openai.OpenAI, base_url: str) -> None:
    listed = client.models.list()
    assert {m.id for m in listed.data} == {"m1", "emb"}
    validate("ListModelsResponse", httpx.get(f"{base_url}/models").json())
    model = client.models.retrieve("m1-alias")
    validate("Model", dump(model))
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("nope")
    assert e.value.code == "model_not_found"


def test_langchain_invoke_and_stream(base_url: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="m1", base_url=base_url, api_key="unused", max_retries=0)
    answer = llm.invoke("what is lmgate?")
    assert str(answer.content).endswith("what is lmgate?")
    streamed = "".join(str(part.content) for part in llm.stream("stream this"))
    assert streamed.endswith("stream this")
