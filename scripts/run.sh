#!/usr/bin/env bash
# Set up (first time) and run lmgate; without arguments, on its embedded defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lmgate serve "$@"
