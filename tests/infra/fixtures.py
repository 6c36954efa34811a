"""Pytest fixtures over the isolated upstream; import them into a conftest to use them."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.infra.isolated import IsolatedUpstream, isolated_upstream, require_netns

STUB_MODULE = "lmgate.testing.stub"
REPO_ROOT = Path(__file__).resolve().parents[2]


def _stub_argv(port: int) -> list[str]:
    return [sys.executable, "-m", STUB_MODULE, "--host", "127.0.0.1", "--port", str(port)]


@pytest.fixture(scope="session")
def isolated_stub() -> Iterator[IsolatedUpstream]:
    """``python -m lmgate.testing.stub`` reachable only through the SOCKS5 and HTTP proxies."""
    require_netns()
    if importlib.util.find_spec(STUB_MODULE) is None:
        pytest.fail(f"{STUB_MODULE} is missing: the isolated_stub fixture runs it")
    with isolated_upstream(_stub_argv, cwd=REPO_ROOT) as upstream:
        yield upstream
