"""Stream a chat answer from lmgate with the async `openai` SDK, several requests at once.

Start the gateway (e.g. ./scripts/run.sh), then:

    .venv/bin/python examples/chat_async_stream.py

LMGATE_URL (default http://127.0.0.1:4000/v1) and LMGATE_MODEL (default lmgate-demo) choose
the gateway and the model.
"""

import asyncio
import os

from openai import AsyncOpenAI

BASE_URL = os.environ.get("LMGATE_URL", "http://127.0.0.1:4000/v1")
MODEL = os.environ.get("LMGATE_MODEL", "lmgate-demo")


async def ask(client: AsyncOpenAI, question: str) -> str:
    """Stream one answer, printing it as it arrives; return the whole text."""
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": question}],
        stream=True,
    )
    parts = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return "".join(parts)


async def main() -> None:
    client = AsyncOpenAI(base_url=BASE_URL, api_key=os.environ.get("LMGATE_API_KEY", "unused"))
    await ask(client, "Say hello in three words.")
    # Concurrent requests: with several deployments, lmgate spreads them by load.
    answers = await asyncio.gather(*(ask(client, f"Count to {n}.") for n in (3, 4, 5)))
    print(f"[{len(answers)} concurrent answers]")
    await client.close()


asyncio.run(main())
