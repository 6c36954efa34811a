"""The documentation is true: its configurations load, its reference tables match the schema,
and its example scripts and code blocks run against a real gateway.

Conventions the documents follow:

* a ```yaml block is a complete configuration and must validate, unless its first line
  starts with ``# partial``;
* in README.md and docs/{configuration,routing,proxies}.md, every ```python block and every
  ```bash block whose first command is ``curl`` runs against a gateway serving
  ``lmgate-demo`` (``http://127.0.0.1:4000`` is replaced by the gateway's address), unless
  its first line starts with ``# partial``;
* a configuration reference table has a ``Default`` column and names each field as
  ``section.field`` in its first column (`<name>` for a provider's name, `[]` for a list item).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typer.testing import CliRunner

from lmgate.cli import app as cli_app
from lmgate.config.loader import load_config, parse_config
from lmgate.config.schema import GatewayConfig
from tests.harness import RunningGateway, Servers

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
# Documents whose YAML blocks must validate: the README and every page under docs/.
YAML_DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Documents whose code blocks are run against a gateway.
RUN_DOCS = [README, CONFIG_DOC, ROOT / "docs" / "routing.md", ROOT / "docs" / "proxies.md"]
REFERENCE_DOCS = [README, CONFIG_DOC]
SCRIPTS = ["chat_sync.py", "chat_async_stream.py", "langchain_chat.py"]

DOC_URL = "http://127.0.0.1:4000"
DEMO_MODEL = "lmgate-demo"
STUB_REPLY = "stub worker answering"
PARTIAL = "# partial"

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S
)
_FIELD = re.compile(r"^`((?:server|providers|models|routing)\b[^`]*)`$")
_PLACEHOLDER = re.compile(r"<[^>]*>")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")  # as in the loader


@dataclass(frozen=True)
class Block:
    """A fenced code block of a document."""

    path: Path
    line: int
    lang: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def partial(self) -> bool:
        return self.text.lstrip().startswith(PARTIAL)


def blocks(paths: list[Path], *langs: str) -> list[Block]:
    """The fenced blocks in `paths` written in one of `langs`, dedented."""
    found = []
    for path in paths:
        if not path.exists():
            continue
        text = path.read_text()
        for m in _FENCE.finditer(text):
            if m["lang"] not in langs:
                continue
            indent = len(m["indent"])
            body = "\n".join(line[indent:] for line in m["body"].splitlines())
            found.append(Block(path, text.count("\n", 0, m.start()) + 1, m["lang"], body + "\n"))
    return found


def curl_blocks() -> list[Block]:
    """Shell blocks whose first command is curl."""
    found = []
    for b in blocks(RUN_DOCS, "bash", "sh"):
        commands = [ln for ln in b.text.splitlines() if ln.strip() and not ln.startswith("#")]
        if commands and commands[0].startswith("curl "):
            found.append(b)
    return found


def _ids(items: list[Block]) -> list[str]:
    return [b.id for b in items]


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for a client process: no proxies, no OpenAI settings of the caller."""
    drop = ("OPENAI_", "LMGATE_")
    proxies = {"http_proxy", "https_proxy", "all_proxy", "no_proxy"}
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(drop) and k.lower() not in proxies
    }
    return {**env, **extra}


# ---------------------------------------------------------------------------------------
# Configurations


def test_example_config_validates() -> None:
    cfg = load_config(EXAMPLES / "lmgate.yaml", env={"OPENAI_API_KEY": "sk-test"})
    assert cfg.providers["openai"].api_key is not None
    assert cfg.providers["openai"].api_key.get_secret_value() == "sk-test"
    llama = next(m for m in cfg.models if m.name == "llama-3.1-70b")
    assert [d.provider for d in llama.deployments] == ["vllm-a", "vllm-b"]
    assert llama.deployments[0].weight == 2
    assert any("*" in m.name for m in cfg.models)
    assert {"llama", "default", "gpt"} <= {a for m in cfg.models for a in m.aliases}


def test_configuration_md_contains_the_example_verbatim() -> None:
    example = (EXAMPLES / "lmgate.yaml").read_text()
    assert f"```yaml\n{example}```" in CONFIG_DOC.read_text()


YAML_BLOCKS = blocks(YAML_DOCS, "yaml", "yml")


def test_the_docs_have_configurations() -> None:
    complete = [b for b in YAML_BLOCKS if not b.partial]
    assert len(complete) >= 5, _ids(complete)


@pytest.mark.parametrize("block", YAML_BLOCKS, ids=_ids(YAML_BLOCKS))
def test_yaml_block_is_a_valid_configuration(block: Block) -> None:
    if block.partial:
        assert yaml.safe_load(block.text) is not None  # still valid YAML
        pytest.skip("marked partial")
    needed = {m[1]: "test-value" for m in _ENV_REF.finditer(block.text) if m[2] is None}
    parse_config(block.text, source=block.id, env=needed)


# ---------------------------------------------------------------------------------------
# Reference tables


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as `X`, `list[X]` or `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def schema_fields(model: type[BaseModel] = GatewayConfig, prefix: str = "") -> dict[str, FieldInfo]:
    """Every field of the schema by dotted path: `providers.<>.timeout.read`, `models[].name`."""
    fields: dict[str, FieldInfo] = {}
    for name, info in model.model_fields.items():
        path = prefix + name
        fields[path] = info
        sub = _model_of(info.annotation)
        if sub is None:
            continue
        origin = typing.get_origin(info.annotation)
        if origin is dict:
            child = f"{path}.<>."
        elif origin is list:
            child = f"{path}[]."
        else:
            child = f"{path}."
        fields.update(schema_fields(sub, child))
    return fields


def reference_rows(path: Path) -> list[tuple[str, str, int]]:
    """(field, default cell, line) of every reference table row in `path`."""
    rows = []
    lines = path.read_text().splitlines()
    header: list[str] = []
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            header = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if i + 1 < len(lines) and re.fullmatch(r"\|[\s|:-]+\|", lines[i + 1].strip()):
            header = cells
            continue
        m = _FIELD.match(cells[0])
        if m and "Default" in header:
            rows.append((m[1], cells[header.index("Default")], i + 1))
    return rows


SCHEMA = schema_fields()


def _normal(path: str) -> str:
    return _PLACEHOLDER.sub("<>", path)


@pytest.mark.parametrize("doc", REFERENCE_DOCS, ids=lambda p: p.name)
def test_reference_table_matches_the_schema(doc: Path) -> None:
    rows = reference_rows(doc)
    assert rows, f"no reference table in {doc.name}"
    documented = set()
    for field, cell, line in rows:
        where = f"{doc.name}:{line}: {field}"
        path = _normal(field)
        assert path in SCHEMA, f"{where}: not a field of the schema"
        documented.add(path)
        info = SCHEMA[path]
        if cell.startswith("required"):
            assert info.is_required(), f"{where}: documented as required, but has a default"
            continue
        assert not info.is_required(), f"{where}: required, but documented with a default"
        literal = re.match(r"`([^`]*)`", cell)
        assert literal, f"{where}: the default must start with a `literal` or 'required'"
        expected = info.get_default(call_default_factory=True)
        assert yaml.safe_load(literal[1]) == expected, f"{where}: the default is {expected!r}"
    leaves_missing = [
        p
        for p in SCHEMA
        if p not in documented and not any(d.startswith((f"{p}.", f"{p}[].")) for d in documented)
    ]
    assert not leaves_missing, f"{doc.name} does not document {leaves_missing}"


def test_cli_options_in_the_readme_exist() -> None:
    text = README.read_text()
    commands = re.findall(r"^\| `lmgate (\w+)([^`]*)`", text, re.M)
    assert {c for c, _ in commands} == {"serve", "init", "doctor", "models"}
    runner = CliRunner()
    for command, usage in commands:
        result = runner.invoke(cli_app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        for option in re.findall(r"--[\w-]+", usage):
            assert option in result.output, f"lmgate {command} has no {option}"


# ---------------------------------------------------------------------------------------
# Scripts and code blocks against a real gateway


@pytest.fixture
def gateway(servers: Servers) -> Iterator[RunningGateway]:
    """A gateway serving the demo model as `lmgate serve` does, on a stub; provider `demo`."""
    stub = servers.stub(chunk_delay=0.001)
    config = {
        "providers": {"demo": {"base_url": stub.url}},
        "models": [{"name": DEMO_MODEL, "provider": "demo", "owned_by": "lmgate"}],
    }
    yield servers.gateway(config)


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script_runs(gateway: RunningGateway, script: str) -> None:
    env = _clean_env(LMGATE_URL=gateway.base_url, LMGATE_MODEL=DEMO_MODEL)
    result = _run([sys.executable, str(EXAMPLES / script)], env)
    assert result.returncode == 0, result.stderr
    assert STUB_REPLY in result.stdout, result.stdout


PYTHON_BLOCKS = [b for b in blocks(RUN_DOCS, "python") if not b.partial]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_python_block_runs(gateway: RunningGateway, block: Block) -> None:
    assert DOC_URL in block.text, f"{block.id}: a runnable block should use {DOC_URL}"
    code = block.text.replace(DOC_URL, gateway.url)
    result = _run([sys.executable, "-c", code], _clean_env())
    assert result.returncode == 0, f"{block.id}\n{result.stderr}"
    assert STUB_REPLY in result.stdout, f"{block.id}\n{result.stdout}"


CURL_BLOCKS = curl_blocks()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("block", CURL_BLOCKS, ids=_ids(CURL_BLOCKS))
def test_curl_block_runs(gateway: RunningGateway, block: Block) -> None:
    script = "set -euo pipefail\n" + block.text.replace(DOC_URL, gateway.url)
    result = _run(["bash", "-c", script], _clean_env())
    assert result.returncode == 0, f"{block.id}\n{result.stderr}"
    assert result.stdout and '"error"' not in result.stdout, f"{block.id}\n{result.stdout}"


def test_the_docs_have_runnable_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 6 and len(CURL_BLOCKS) >= 3
