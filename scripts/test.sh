#!/usr/bin/env bash
# Set up (first time) and run every check: ruff, mypy and the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
.venv/bin/ruff check lmgate tests bench examples
.venv/bin/ruff format --check lmgate tests bench examples
.venv/bin/mypy
exec .venv/bin/pytest -q "$@"
