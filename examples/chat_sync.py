"""Chat with lmgate through the official `openai` SDK, synchronously.

Start the gateway (e.g. ./scripts/run.sh), then:

    .venv/bin/python examples/chat_sync.py

LMGATE_URL (default http://127.0.0.1:4000/v1) and LMGATE_MODEL (default lmgate-demo) choose
the gateway and the model.
"""

import os

from openai import OpenAI

BASE_URL = os.environ.get("LMGATE_URL", "http://127.0.0.1:4000/v1")
MODEL = os.environ.get("LMGATE_MODEL", "lmgate-demo")

# lmgate does not check client keys yet; the SDK only needs a non-empty value.
client = OpenAI(base_url=BASE_URL, api_key=os.environ.get("LMGATE_API_KEY", "unused"))

reply = client.chat.completions.create(
    model=MODEL,
    messages=[
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": "What is an LLM gateway?"},
    ],
    # The gateway's own per-request limit (total seconds); 504 when exceeded.
    extra_headers={"x-lmgate-timeout": "60"},
)
print(reply.choices[0].message.content)
if reply.usage is not None:
    print(f"[{reply.model}: {reply.usage.total_tokens} tokens]")
