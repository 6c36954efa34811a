"""The documentation is true: its configurations load, its reference tables match the schema,
and its example scripts and code blocks run against a real gateway.

Conventions the documents follow:

* a ```yaml block is a complete configuration and must validate, unless its first line
  starts with ``# partial``;
* in README.md and docs/{configuration,routing,proxies,accounting}.md, every ```python block
  and every ```bash block whose first command is ``curl`` runs against a gateway serving
  ``lmgate-demo`` (``http://127.0.0.1:4000`` is replaced by the gateway's address), unless
  its first line starts with ``# partial``;
* a block that mentions ``LMGATE_KEY``, ``LMGATE_ADMIN_KEY`` or ``/admin`` runs against a
  gateway with keys on: a fresh SQLite database, the team ``ml``, the user ``alice`` in it and
  a key of hers (no budget, every model), the ledger on, and the models ``lmgate-demo`` and
  ``gpt-4o-mini`` (priced). The environment holds her key in ``LMGATE_KEY`` and the admin key
  in ``LMGATE_ADMIN_KEY``; the placeholder prefix ``lmg-AbCdEfGh`` is replaced by her key's;
* in the same documents, the ```bash blocks whose first command is an administration command
  (``lmgate db|users|teams|keys|budgets|usage``, or ``.venv/bin/lmgate ...``) run line by line,
  in document order, as one session per document: in an empty folder holding a
  ``lmgate.yaml`` with keys on, and ``lmgate`` (also as ``.venv/bin/lmgate``) on the PATH.
  ``lmg-AbCdEfGh`` stands for the prefix of the last key the session created;
* other blocks (```text, ```json, ```sql, other commands) are illustrations and do not run;
* a configuration reference table has a ``Default`` column and names each field as
  ``section.field`` in its first column (`<name>` or `<model>` for a name chosen by the user,
  `[]` for a list item). A union of sections told apart by a tag (``models[].backend``, by
  ``type``) is one section holding every variant's fields; its tag is ``required``.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import subprocess
import sys
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from typer.testing import CliRunner

from lmgate.cli import app as cli_app
from lmgate.config.loader import load_config, parse_config
from lmgate.config.schema import GatewayConfig
from lmgate.storage.db import Database
from lmgate.storage.keys import create_key
from lmgate.storage.users import create_team, create_user
from tests.harness import RunningGateway, Servers

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
CONFIG_DOC = ROOT / "docs" / "configuration.md"
ACCOUNTING_DOC = ROOT / "docs" / "accounting.md"
# Documents whose YAML blocks must validate: the README and every page under docs/.
YAML_DOCS = [README, *sorted((ROOT / "docs").glob("*.md"))]
# Documents whose code blocks are run against a gateway.
RUN_DOCS = [
    README,
    CONFIG_DOC,
    ROOT / "docs" / "routing.md",
    ROOT / "docs" / "proxies.md",
    ACCOUNTING_DOC,
]
REFERENCE_DOCS = [README, CONFIG_DOC]
SCRIPTS = ["chat_sync.py", "chat_async_stream.py", "langchain_chat.py"]

DOC_URL = "http://127.0.0.1:4000"
DEMO_MODEL = "lmgate-demo"
STUB_REPLY = "stub worker answering"
PARTIAL = "# partial"
PRICED_MODEL = "gpt-4o-mini"
PREFIX_PLACEHOLDER = "lmg-AbCdEfGh"
ADMIN_COMMANDS = ("db", "users", "teams", "keys", "budgets", "usage")

_FENCE = re.compile(
    r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^(?P=indent)```", re.M | re.S
)
_FIELD = re.compile(rf"^`((?:{'|'.join(GatewayConfig.model_fields)})\b[^`]*)`$")
_KEYED = re.compile(r"\bLMGATE_(?:ADMIN_)?KEY\b|/admin\b")
_ADMIN_CLI = re.compile(rf"^(?:\.venv/bin/)?lmgate ({'|'.join(ADMIN_COMMANDS)})\b")
_CREATED_KEY = re.compile(r"^created key (lmg-\S+)", re.M)
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


def command_lines(block: Block) -> list[str]:
    """The commands of a shell block: comments and blank lines dropped, `\\` lines joined."""
    text = re.sub(r"\\\n\s*", " ", block.text)
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def curl_blocks() -> list[Block]:
    """Shell blocks whose first command is curl."""
    found = []
    for b in blocks(RUN_DOCS, "bash", "sh"):
        commands = command_lines(b)
        if commands and commands[0].startswith("curl ") and not b.partial:
            found.append(b)
    return found


def cli_blocks(path: Path) -> list[Block]:
    """Shell blocks of `path` whose first command is an administration command."""
    found = []
    for b in blocks([path], "bash", "sh"):
        commands = command_lines(b)
        if commands and _ADMIN_CLI.match(commands[0]) and not b.partial:
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


def _models_of(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside an annotation: `X`, `list[X]`, `dict[str, X]`, `X | Y`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_of(arg)]


def _variant_fields(variants: list[type[BaseModel]]) -> dict[str, FieldInfo]:
    """The fields of a tagged union's variants as one section; the tag is required."""
    if len(variants) == 1:
        return dict(variants[0].model_fields)
    tags = {  # a Literal field in every variant, with other values in each
        name
        for name, info in variants[0].model_fields.items()
        if typing.get_origin(info.annotation) is typing.Literal
        and all(
            name in v.model_fields and v.model_fields[name].annotation != info.annotation
            for v in variants[1:]
        )
    }
    fields: dict[str, FieldInfo] = {}
    for variant in variants:
        for name, info in variant.model_fields.items():
            if name in tags:
                info = FieldInfo(annotation=str)  # the union has no default variant
            elif name in fields:
                default = info.get_default(call_default_factory=True)
                known = fields[name].get_default(call_default_factory=True)
                assert default == known, f"{name}: the variants' defaults differ"
            fields.setdefault(name, info)
    return fields


def schema_fields(model: type[BaseModel] = GatewayConfig, prefix: str = "") -> dict[str, FieldInfo]:
    """Every field of the schema by dotted path: `providers.<>.timeout.read`, `models[].name`."""
    return _section_fields([model], prefix)


def _section_fields(variants: list[type[BaseModel]], prefix: str) -> dict[str, FieldInfo]:
    fields: dict[str, FieldInfo] = {}
    for name, info in _variant_fields(variants).items():
        path = prefix + name
        fields[path] = info
        subs = _models_of(info.annotation)
        if not subs:
            continue
        origin = typing.get_origin(info.annotation)
        if origin is dict:
            child = f"{path}.<>."
        elif origin is list:
            child = f"{path}[]."
        else:
            child = f"{path}."
        fields.update(_section_fields(subs, child))
    return fields


def _plain(value: Any) -> Any:
    """A default as YAML writes it: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


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
        assert yaml.safe_load(literal[1]) == _plain(expected), (
            f"{where}: the default is {expected!r}"
        )
    leaves_missing = [
        p
        for p in SCHEMA
        if p not in documented and not any(d.startswith((f"{p}.", f"{p}[].")) for d in documented)
    ]
    assert not leaves_missing, f"{doc.name} does not document {leaves_missing}"


def cli_commands() -> set[tuple[str, ...]]:
    """Every command of the CLI: `("serve",)`, `("keys", "create")`, ..."""
    root: Any = typer.main.get_command(cli_app)
    found: set[tuple[str, ...]] = set()
    for name, command in root.commands.items():
        subcommands = getattr(command, "commands", None)
        if subcommands:
            found |= {(name, sub) for sub in subcommands}
        if not subcommands or getattr(command, "invoke_without_command", False):
            found.add((name,))  # a command, or a group that is also one (`lmgate backends`)
    return found


def test_cli_options_in_the_readme_exist() -> None:
    """The README's command table names every command, with options that exist."""
    rows = re.findall(r"^\| `lmgate ([^`]*)`", README.read_text(), re.M)
    documented = set()
    runner = CliRunner()
    for row in rows:
        words = row.split()
        argv = words[:2] if len(words) > 1 and re.fullmatch(r"[a-z]+", words[1]) else words[:1]
        documented.add(tuple(argv))
        result = runner.invoke(cli_app, [*argv, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, f"lmgate {row}: {result.output}"
        for option in re.findall(r"--[\w-]+", row):
            assert option in result.output, f"lmgate {' '.join(argv)} has no {option}"
    assert documented == cli_commands()


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


@dataclass(frozen=True)
class KeyedGateway:
    """A gateway with keys on, the key of the user `alice`, and the admin key."""

    gateway: RunningGateway
    key: str
    prefix: str
    admin_key: str

    @property
    def env(self) -> dict[str, str]:
        return {"LMGATE_KEY": self.key, "LMGATE_ADMIN_KEY": self.admin_key}


def _provision(url: str) -> tuple[str, str]:
    """Migrate a database, add the team `ml`, the user `alice` and a key; (key, prefix)."""

    async def main() -> tuple[str, str]:
        db = Database(url)
        try:
            await db.upgrade()
            await create_team(db, "ml")
            await create_user(db, "alice", email="alice@example.org", team="ml")
            row, secret = await create_key(db, "alice", name="docs")
            return secret, row.prefix
        finally:
            await db.close()

    return asyncio.run(main())


@pytest.fixture
def keyed_gateway(servers: Servers, tmp_path: Path) -> KeyedGateway:
    """A gateway with keys, the ledger and the admin API on, over a fresh SQLite database."""
    stub = servers.stub(chunk_delay=0.001)
    url = f"sqlite+aiosqlite:///{tmp_path / 'lmgate.db'}"
    key, prefix = _provision(url)
    admin_key = "adm-" + secrets.token_urlsafe(16)
    config = {
        "database": {"url": url},
        "auth": {"enabled": True, "admin_key": admin_key},
        "accounting": {"enabled": True, "spool_path": str(tmp_path / "ledger.spool")},
        "providers": {"demo": {"base_url": stub.url}},
        "models": [
            {"name": DEMO_MODEL, "provider": "demo", "owned_by": "lmgate"},
            {"name": PRICED_MODEL, "provider": "demo"},
        ],
    }
    return KeyedGateway(servers.gateway(config), key, prefix, admin_key)


def _target(request: pytest.FixtureRequest, block: Block) -> tuple[str, dict[str, str]]:
    """A block's code for the gateway it needs, and the environment to run it in."""
    if _KEYED.search(block.text):
        keyed: KeyedGateway = request.getfixturevalue("keyed_gateway")
        code = block.text.replace(PREFIX_PLACEHOLDER, keyed.prefix)
        return code.replace(DOC_URL, keyed.gateway.url), _clean_env(**keyed.env)
    gateway: RunningGateway = request.getfixturevalue("gateway")
    return block.text.replace(DOC_URL, gateway.url), _clean_env()


def _run(
    argv: list[str], env: dict[str, str], cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script_runs(gateway: RunningGateway, script: str) -> None:
    env = _clean_env(LMGATE_URL=gateway.base_url, LMGATE_MODEL=DEMO_MODEL)
    result = _run([sys.executable, str(EXAMPLES / script)], env)
    assert result.returncode == 0, result.stderr
    assert STUB_REPLY in result.stdout, result.stdout


PYTHON_BLOCKS = [b for b in blocks(RUN_DOCS, "python") if not b.partial]


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=_ids(PYTHON_BLOCKS))
def test_python_block_runs(request: pytest.FixtureRequest, block: Block) -> None:
    assert DOC_URL in block.text, f"{block.id}: a runnable block should use {DOC_URL}"
    code, env = _target(request, block)
    result = _run([sys.executable, "-c", code], env)
    assert result.returncode == 0, f"{block.id}\n{result.stderr}"
    assert STUB_REPLY in result.stdout, f"{block.id}\n{result.stdout}"


CURL_BLOCKS = curl_blocks()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("block", CURL_BLOCKS, ids=_ids(CURL_BLOCKS))
def test_curl_block_runs(request: pytest.FixtureRequest, block: Block) -> None:
    code, env = _target(request, block)
    result = _run(["bash", "-c", "set -euo pipefail\n" + code], env)
    assert result.returncode == 0, f"{block.id}\n{result.stderr}"
    assert result.stdout and '"error"' not in result.stdout, f"{block.id}\n{result.stdout}"


CLI_DOCS = [doc for doc in RUN_DOCS if cli_blocks(doc)]


@pytest.mark.parametrize("doc", CLI_DOCS, ids=lambda p: p.name)
def test_cli_blocks_run_in_order(doc: Path, tmp_path: Path) -> None:
    """A document's administration commands, run as one session against a fresh database."""
    (tmp_path / "lmgate.yaml").write_text("auth:\n  enabled: true\n")
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    launcher = bin_dir / "lmgate"
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m lmgate "$@"\n')
    launcher.chmod(0o755)
    env = _clean_env(PATH=f"{bin_dir}:{os.environ.get('PATH', '')}", COLUMNS="200")
    prefix: str | None = None
    for block in cli_blocks(doc):
        for line in command_lines(block):
            if PREFIX_PLACEHOLDER in line:
                assert prefix, f"{block.id}: `{line}` needs a key created before it"
                line = line.replace(PREFIX_PLACEHOLDER, prefix)
            result = _run(["bash", "-c", "set -euo pipefail\n" + line], env, cwd=tmp_path)
            assert result.returncode == 0, f"{block.id}: `{line}`\n{result.stdout}{result.stderr}"
            created = _CREATED_KEY.search(result.stdout)
            if created:
                prefix = created[1]


def test_the_docs_have_runnable_blocks() -> None:
    assert len(PYTHON_BLOCKS) >= 6 and len(CURL_BLOCKS) >= 3
    assert {README, ACCOUNTING_DOC} <= set(CLI_DOCS)
