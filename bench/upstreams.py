"""Configuration files for the fixed-answer nginx upstream and for the gateways under test."""

from __future__ import annotations

import os
from pathlib import Path

import orjson

CHAT_COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "bench-model",
    "system_fingerprint": None,
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "The sea covers most of the Earth and hides most of its life.",
            },
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 27, "completion_tokens": 14, "total_tokens": 41},
}

MODELS = {
    "object": "list",
    "data": [{"id": "bench-model", "object": "model", "created": 1700000000, "owned_by": "bench"}],
}

UPSTREAM_KEY = "bench-secret"


def nginx_conf(root: Path, port: int) -> Path:
    """Write <root>/nginx.conf: chat completions answered with a fixed JSON body."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""
    chat = orjson.dumps(CHAT_COMPLETION).decode()
    models = orjson.dumps(MODELS).decode()
    conf = f"""{user}daemon off;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 10000000;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location /v1/chat/completions {{
            default_type application/json;
            return 200 '{chat}';
        }}
        location /v1/models {{
            default_type application/json;
            return 200 '{models}';
        }}
        location /health {{ return 200 'ok'; }}
    }}
}}
"""
    path = root / "nginx.conf"
    path.write_text(conf)
    return path


# Prices for the benchmark's models (the gpt-4o-mini list price), so that every request is
# priced: the budget reservation and the cost computation really run.
BENCH_PRICE = "{input: 0.15, output: 0.60, cached_input: 0.075}"


LIMIT_SPEC = "{rpm: 1000000000, tpm: 1000000000000, max_parallel: 100000}"
"""Per-model limits for the --limits runs: checked and counted on every request, never hit."""


def lmgate_conf(
    tmp: Path,
    port: int,
    nginx_port: int,
    stub_port: int,
    accounting: bool = False,
    limits_redis: str | None = None,
) -> Path:
    """Write the lmgate YAML config: bench-model -> nginx, stream-model -> SSE stub.

    Without `accounting`: routing only (no keys, no budgets, no ledger). With it: keys
    required, a SQLite database and a ledger in `tmp` (one database per gateway start), and
    both models priced. `limits_redis`: RPM, TPM and in-flight limits on both models, held
    in process (`"local"`) or in the Redis at that URL.
    """
    if accounting:
        extra = f"""database:
  url: sqlite+aiosqlite:///{accounting_db(tmp, port)}
auth:
  enabled: true
accounting:
  enabled: true
  spool_path: {tmp}/lmgate-ledger-{port}.spool
  prices:
    bench-model: {BENCH_PRICE}
    stream-model: {BENCH_PRICE}
"""
    else:
        extra = """auth:
  enabled: false
accounting:
  enabled: false
"""
    if limits_redis is not None:
        redis = "" if limits_redis == "local" else f"\n  redis_url: {limits_redis}"
        extra += f"""limits:{redis}
  model:
    bench-model: {LIMIT_SPEC}
    stream-model: {LIMIT_SPEC}
"""
    conf = f"""server:
  host: 127.0.0.1
  port: {port}
  access_log: false
{extra}providers:
  upstream:
    type: openai
    base_url: http://127.0.0.1:{nginx_port}/v1
    api_key: {UPSTREAM_KEY}
  stub:
    type: openai
    base_url: http://127.0.0.1:{stub_port}/v1
    api_key: {UPSTREAM_KEY}
models:
  - name: bench-model
    provider: upstream
  - name: stream-model
    provider: stub
"""
    path = tmp / f"lmgate-{port}.yaml"
    path.write_text(conf)
    return path


def accounting_db(tmp: Path, port: int) -> Path:
    """The SQLite database of the accounting gateway started on `port`."""
    return tmp / f"lmgate-{port}.db"


def litellm_conf(tmp: Path, nginx_port: int, stub_port: int) -> Path:
    """Write LiteLLM's proxy config with the same two models."""
    conf = f"""model_list:
  - model_name: bench-model
    litellm_params:
      model: openai/bench-model
      api_base: http://127.0.0.1:{nginx_port}/v1
      api_key: {UPSTREAM_KEY}
  - model_name: stream-model
    litellm_params:
      model: openai/stream-model
      api_base: http://127.0.0.1:{stub_port}/v1
      api_key: {UPSTREAM_KEY}
litellm_settings:
  telemetry: false
  set_verbose: false
"""
    path = tmp / "litellm.yaml"
    path.write_text(conf)
    return path
