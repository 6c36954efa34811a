"""Load the YAML configuration: `${ENV}` interpolation and errors that name line and field."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lmgate.config.schema import GatewayConfig

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """The configuration is invalid; the message lists every problem with its line."""


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, interpolate and validate a configuration file."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    config = parse_config(text, source=str(p), env=os.environ if env is None else env)
    config._base_dir = p.resolve().parent
    return config


def parse_config(text: str, source: str = "<config>", env: Mapping[str, str] = {}) -> GatewayConfig:
    """Validate configuration text; raise ConfigError naming each bad field and its line."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    problems: list[str] = []
    data = _interpolate(data, (), env, problems, root, source)
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = tuple(err["loc"])
            where = ".".join(str(x) for x in loc) or "(top level)"
            lines.append(f"{source}:{_line(root, loc)}: {where}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def _interpolate(
    value: Any, loc: Loc, env: Mapping[str, str], problems: list[str], root: Any, source: str
) -> Any:
    if isinstance(value, dict):
        return {
            k: _interpolate(v, (*loc, k), env, problems, root, source) for k, v in value.items()
        }
    if isinstance(value, list):
        return [
            _interpolate(v, (*loc, i), env, problems, root, source) for i, v in enumerate(value)
        ]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        where = ".".join(str(x) for x in loc)
        problems.append(
            f"{source}:{_line(root, loc)}: {where}: environment variable {name} is not set"
        )
        return ""

    return _ENV_REF.sub(sub, value)


def _line(root: Any, loc: Loc) -> int:
    """The 1-based line of the deepest YAML node that `loc` reaches."""
    node = root
    line = node.start_mark.line + 1 if node is not None else 1
    for key in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    child = v
                    line = k.start_mark.line + 1
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            child = node.value[key]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line
