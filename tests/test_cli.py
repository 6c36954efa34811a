"""`lmgate init`, `doctor` and `models`, and the provider probe, against real stub upstreams."""

from __future__ import annotations

import asyncio
import io
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner, Result

from lmgate.cli import app
from lmgate.cli.init import free_port
from lmgate.config.loader import load_config
from lmgate.config.schema import ProviderConfig
from lmgate.storage.db import Database
from lmgate.storage.prices import set_price as set_model_price
from lmgate.upstream.probe import ProbeResult, probe
from lmgate.upstream.provider import Provider
from tests.harness import Servers
from tests.infra.isolated import IsolatedUpstream

KEY = "sk-test-7f3c9a1e5b"
WRONG_KEY = "sk-wrong-0d2e4f6a8c"
MODELS = ["alpha", "beta"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def upstream(servers: Servers) -> str:
    """The base URL of a stub that wants KEY and lists MODELS."""
    return servers.stub(api_key=KEY, models=MODELS).url


@pytest.fixture
def dead_url() -> str:
    """A base URL where nothing listens."""
    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "MISTRAL_API_KEY", "MISTRAL_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "250")  # rich tables on one line each


def _run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(app, list(args), input=input)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _answers(*lines: str) -> str:
    return "\n".join(lines) + "\n"


async def _probe(timeout: float = 5.0, **config: str) -> ProbeResult:
    provider = Provider("p", ProviderConfig.model_validate(config))
    try:
        return await probe(provider, timeout)
    finally:
        await provider.close()


# -- probe --------------------------------------------------------------------------------


async def test_probe_lists_the_models(upstream: str) -> None:
    result = await _probe(base_url=upstream, api_key=KEY)
    assert result.ok and result.status == 200 and result.error is None
    assert result.models == MODELS
    assert result.latency_ms > 0


async def test_probe_reports_a_rejected_key(upstream: str) -> None:
    result = await _probe(base_url=upstream, api_key=WRONG_KEY)
    assert (result.ok, result.status) == (False, 401)
    assert result.error == "the provider rejected the API key"


async def test_probe_reports_an_unreachable_provider(dead_url: str) -> None:
    result = await _probe(base_url=dead_url, api_key=KEY)
    assert (result.ok, result.status) == (False, None)
    assert result.error is not None and result.error.endswith("failed: Connection refused")


async def test_probe_reports_a_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        result = await _probe(timeout=0.2, base_url=f"http://127.0.0.1:{port}/v1")
    assert not result.ok
    assert result.error == "no answer within 0.2 s"


@pytest.fixture
async def refusing_socks5() -> AsyncIterator[int]:
    """A SOCKS5 proxy that answers every CONNECT with "connection refused"."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, methods = await reader.readexactly(2)
        await reader.readexactly(methods)
        writer.write(b"\x05\x00")
        await reader.read(512)
        writer.write(b"\x05\x05\x00\x01" + bytes(6))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_probe_reports_proxy_failures(upstream: str, refusing_socks5: int) -> None:
    dead_proxy = f"socks5://u:pw9@127.0.0.1:{free_port()}"
    dead = await _probe(base_url=upstream, api_key=KEY, proxy=dead_proxy)
    assert not dead.ok
    assert dead.error is not None and dead.error.startswith("could not reach the proxy")
    refused = await _probe(base_url=upstream, proxy=f"socks5://127.0.0.1:{refusing_socks5}")
    assert not refused.ok
    assert refused.error is not None and refused.error.startswith("the proxy refused")


def test_doctor_probes_through_each_providers_proxy(
    isolated_stub: IsolatedUpstream, tmp_path: Path
) -> None:
    """The stub in its own network namespace: only the proxies reach it."""
    url = f"http://{isolated_stub.upstream_host_port}/v1"
    config = tmp_path / "lmgate.yaml"
    config.write_text(
        "providers:\n"
        f"  direct: {{base_url: '{url}'}}\n"
        f"  socks: {{base_url: '{url}', proxy: '{isolated_stub.socks5_url}'}}\n"
        f"  http: {{base_url: '{url}', proxy: '{isolated_stub.http_proxy_url}'}}\n"
    )
    result = _run("doctor", "--config", str(config))
    assert result.exit_code == 1, result.output
    assert "1 provider(s) failed: direct" in result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if "│" in line}
    assert "ok (200)" in rows["socks"] and isolated_stub.socks5_url in rows["socks"]
    assert "ok (200)" in rows["http"] and isolated_stub.http_proxy_url in rows["http"]
    assert "Connection refused" in rows["direct"]


# -- doctor -------------------------------------------------------------------------------


def test_doctor_fails_naming_the_bad_providers(
    upstream: str, dead_url: str, tmp_path: Path
) -> None:
    config = _write(
        tmp_path / "lmgate.yaml",
        "providers:\n"
        f"  good: {{base_url: '{upstream}', api_key: {KEY}}}\n"
        f"  bad: {{base_url: '{upstream}', api_key: {WRONG_KEY}}}\n"
        f"  dead: {{base_url: '{dead_url}'}}\n"
        "models:\n"
        "  - {name: alpha, provider: good}\n"
        "  - name: beta\n"
        "    deployments: [{provider: bad}, {provider: dead}]\n"
        "  - name: mixed\n"
        "    deployments: [{provider: good, model: beta}, {provider: bad}]\n",
    )
    result = _run("doctor", "-c", str(config))
    assert result.exit_code == 1
    out = result.output
    assert "2 provider(s) failed: bad, dead" in out
    assert "the provider rejected the API key" in out
    assert "failed: Connection refused" in out
    assert "model beta: no reachable deployment (bad, dead failed)" in out
    assert "model mixed: deployments on bad are unreachable" in out
    assert "model alpha: no reachable" not in out and "model alpha: deployments" not in out
    assert KEY not in out and WRONG_KEY not in out


def test_doctor_passes_and_flags_unlisted_models(upstream: str, tmp_path: Path) -> None:
    config = _write(
        tmp_path / "lmgate.yaml",
        "providers:\n"
        f"  good: {{base_url: '{upstream}', api_key: {KEY}}}\n"
        "models:\n"
        "  - {name: alpha, provider: good}\n"
        "  - {name: gamma, provider: good}\n",
    )
    result = _run("doctor", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "every provider answers" in result.output
    assert "model gamma: good does not list 'gamma'" in result.output
    assert "model alpha: good" not in result.output


@pytest.mark.parametrize("command", ["doctor", "models"])
def test_a_bad_field_is_reported_with_its_line(command: str, tmp_path: Path) -> None:
    config = _write(
        tmp_path / "lmgate.yaml",
        "server:\n"
        "  port: 4000\n"
        "providers:\n"
        "  good:\n"
        "    base_url: http://127.0.0.1:1/v1\n"
        "    timeout:\n"
        "      connect: -1\n",
    )
    result = _run(command, "--config", str(config))
    assert result.exit_code == 2
    assert f"{config}:7: providers.good.timeout.connect: Input should be greater than 0" in (
        result.output
    )


@pytest.fixture
def embedded_openai(upstream: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Embedded defaults with one provider, `openai`, at the stub; no Ollama."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", upstream)
    monkeypatch.setattr("lmgate.cli.models.ollama_answers", lambda: False)


@pytest.mark.usefixtures("embedded_openai")
def test_without_config_doctor_checks_the_embedded_defaults(upstream: str) -> None:
    result = _run("doctor")
    assert result.exit_code == 0, result.output
    assert "embedded defaults" in result.output
    assert "openai" in result.output and upstream in result.output
    assert "lmgate-demo" not in result.output and KEY not in result.output


# -- models -------------------------------------------------------------------------------


def test_models_shows_every_route_without_network(tmp_path: Path) -> None:
    config = _write(
        tmp_path / "lmgate.yaml",
        "providers:\n"
        "  east: {base_url: 'http://10.255.0.1:9/v1', api_key: secret-east}\n"
        "  west: {base_url: 'http://user:pw@10.255.0.2:9/v1', wildcard: false}\n"
        "models:\n"
        "  - name: chat\n"
        "    aliases: [default, gpt]\n"
        "    deployments:\n"
        "      - {provider: east, model: llama-70b, weight: 3}\n"
        "      - {provider: west, model: llama-70b-awq}\n"
        "  - {name: 'east-*', provider: east}\n",
    )
    result = _run("models", "--config", str(config))
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1:-1] for line in result.output.splitlines() if "│" in line]
    cells = [[c.strip() for c in row] for row in rows]
    assert cells == [
        ["chat", "default, gpt", "east", "llama-70b", "3", "http://10.255.0.1:9/v1"],
        ["", "", "west", "llama-70b-awq", "1", "http://10.255.0.2:9/v1"],
        ["east-*", "", "east", "(the requested name)", "1", "http://10.255.0.1:9/v1"],
    ]
    assert "east/* -> east (http://10.255.0.1:9/v1)" in result.output
    assert "west/*" not in result.output
    assert "secret-east" not in result.output and "user:pw" not in result.output


@pytest.mark.usefixtures("embedded_openai")
def test_without_config_models_shows_the_embedded_defaults(upstream: str) -> None:
    result = _run("models")
    assert result.exit_code == 0, result.output
    assert f"openai/* -> openai ({upstream})" in result.output
    assert "openai: lists its own models at start" in result.output
    assert "lmgate-demo" not in result.output


# -- init ---------------------------------------------------------------------------------


def test_init_writes_a_config_that_loads(
    upstream: str, dead_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenAI preset with the key from the environment, plus an unreachable provider."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    output = tmp_path / "lmgate.yaml"
    answers = _answers(
        *("1", "", upstream, "", ""),  # OpenAI at the stub, ${OPENAI_API_KEY}, no proxy
        "y",  # another provider
        *("4", "backup", dead_url, "", ""),  # vLLM preset, no key, no proxy
        "n",  # no more
        *("n", "alpha, gamma"),  # openai: list two models rather than all
        "y",  # keep the unreachable backup
        "",  # write
    )
    result = _run("init", "--output", str(output), input=answers)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "ok (200)" in out and "failed: Connection refused" in out
    assert "openai offers 2 model(s): alpha, beta" in out
    assert "warning: openai does not list gamma" in out
    assert KEY not in out
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    doc = yaml.safe_load(output.read_text())
    assert doc["providers"]["openai"] == {"base_url": upstream, "api_key": "${OPENAI_API_KEY}"}
    assert doc["providers"]["backup"] == {"base_url": dead_url}
    cfg = load_config(output, env={"OPENAI_API_KEY": KEY})
    assert 1024 <= cfg.server.port <= 65535 and cfg.server.host == "127.0.0.1"
    assert [(m.name, m.deployments[0].provider) for m in cfg.models] == [
        ("alpha", "openai"),
        ("gamma", "openai"),
    ]


def test_init_masks_secrets_and_drops_rejected_providers(upstream: str, tmp_path: Path) -> None:
    output = tmp_path / "lmgate.yaml"
    proxy = f"socks5://user:hunter2@127.0.0.1:{free_port()}"
    answers = _answers(
        *("4", "good", upstream, KEY, "n", ""),  # the key itself goes into the file
        "y",
        *("4", "bad", upstream, WRONG_KEY, "y", "", ""),  # as ${BAD_API_KEY}
        "y",
        *("3", "", "http://127.0.0.1:11434/v1", proxy),  # Ollama through a dead proxy
        "n",
        "y",  # good: list all its models
        "n",  # do not keep bad
        "y",  # keep ollama
        "y",  # write
    )
    result = _run("init", "-o", str(output), "--port", "4123", input=answers)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "the provider rejected the API key" in out
    assert "could not reach the proxy" in out
    assert "user:********@127.0.0.1" in out and "api_key: '********'" in out
    assert KEY not in out and WRONG_KEY not in out
    assert out.count("hunter2") == 1  # the typed answer, echoed; never shown again
    cfg = load_config(output, env={})
    assert list(cfg.providers) == ["good", "ollama"]
    good = cfg.providers["good"]
    assert good.api_key is not None and good.api_key.get_secret_value() == KEY
    assert good.discover_models and cfg.server.port == 4123
    assert cfg.providers["ollama"].proxy == proxy


def test_init_asks_again_after_invalid_answers(dead_url: str, tmp_path: Path) -> None:
    output = tmp_path / "lmgate.yaml"
    answers = _answers(
        *("9", "4"),
        *("v1", "local"),
        *("ftp://host/v1", dead_url),
        "",  # no key
        *("ftp://proxy:1", ""),
        "n",
        "y",  # keep local
        "n",  # do not write
    )
    result = _run("init", "-o", str(output), input=answers)
    assert result.exit_code == 1
    out = result.output
    assert "Error: answer a number from 1 to 4" in out
    assert "Error: use letters, digits" in out
    assert "Error: must start with http:// or https://" in out
    assert "Error: proxy scheme must be one of" in out
    assert "Nothing written." in out
    assert not output.exists()


def test_init_does_not_replace_a_file_unless_told(tmp_path: Path) -> None:
    output = _write(tmp_path / "lmgate.yaml", "server: {port: 1}\n")
    result = _run("init", "-o", str(output), input="n\n")
    assert result.exit_code == 1
    assert output.read_text() == "server: {port: 1}\n"


def test_init_in_a_terminal_hides_the_key(upstream: str, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    output = tmp_path / "lmgate.yaml"
    transcript = io.StringIO()
    child = pexpect.spawn(
        sys.executable,
        ["-m", "lmgate", "init", "-o", str(output)],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=30,
        dimensions=(50, 200),
    )
    child.logfile_read = transcript
    for prompt, answer in [
        ("Provider type", "4"),
        ("Name", "local"),
        ("Base URL", upstream),
        ("API key", KEY),
        ("instead of the key", "n"),
        ("Outbound proxy", ""),
        ("Add another provider", "n"),
        ("List all of them", "y"),
        ("Write it to", "y"),
    ]:
        child.expect(prompt)
        child.sendline(answer)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, transcript.getvalue()
    assert KEY not in transcript.getvalue()
    assert load_config(output, env={}).providers["local"].discover_models


def test_doctor_flags_models_without_a_price(upstream: str, tmp_path: Path) -> None:
    """A model with no known price is metered at $0: doctor says so, unless the shipped
    table, the configuration or the database (`lmgate` admin prices) has one."""
    db = tmp_path / "lmgate.db"
    config = _write(
        tmp_path / "lmgate.yaml",
        "providers:\n"
        f"  good: {{base_url: '{upstream}', api_key: {KEY}}}\n"
        "models:\n"
        "  - {name: alpha, provider: good}\n"
        "  - {name: gamma, provider: good, model: gpt-4o-mini}\n"
        "  - {name: house-llm, provider: good}\n"
        "  - {name: priced-here, provider: good}\n"
        f"database: {{url: 'sqlite+aiosqlite:///{db}'}}\n"
        "accounting:\n"
        "  prices: {priced-here: {input: 0, output: 0}}\n",
    )
    out = _run("doctor", "--config", str(config)).output
    assert "model alpha: no price in the shipped table or configuration" in out
    assert "model house-llm: no price" in out
    assert "model gamma: no price" not in out  # its upstream model is in the shipped table
    assert "model priced-here: no price" not in out
    assert not db.exists()  # doctor does not create the database

    async def set_price() -> None:
        database = Database(f"sqlite+aiosqlite:///{db}")
        await database.upgrade()
        await set_model_price(database, "house-llm", 0.5, 1.5)
        await database.close()

    asyncio.run(set_price())
    out = _run("doctor", "--config", str(config)).output
    assert "model alpha: no price in the shipped table, configuration or database" in out
    assert "model house-llm: no price" not in out
