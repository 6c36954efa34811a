"""Use lmgate from LangChain: `ChatOpenAI` pointed at the gateway.

Start the gateway (e.g. ./scripts/run.sh), then:

    .venv/bin/python examples/langchain_chat.py

LMGATE_URL (default http://127.0.0.1:4000/v1) and LMGATE_MODEL (default lmgate-demo) choose
the gateway and the model.
"""

import os

from langchain_openai import ChatOpenAI

llm = ChatOpenAI(
    model=os.environ.get("LMGATE_MODEL", "lmgate-demo"),
    base_url=os.environ.get("LMGATE_URL", "http://127.0.0.1:4000/v1"),
    api_key=os.environ.get("LMGATE_API_KEY", "unused"),  # not checked by lmgate yet
)

print(llm.invoke("What does a gateway do?").content)
for part in llm.stream("Stream a short answer."):
    print(part.content, end="", flush=True)
print()
