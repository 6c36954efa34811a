#!/usr/bin/env bash
# Set up a development environment: a virtualenv in .venv with lmgate installed (editable).
# With --test, also the test dependencies and the system tools the tests use (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

if (( want_test )); then
  missing=()
  for tool in sshd:openssh-server tinyproxy:tinyproxy socat:socat ip:iproute2 curl:curl \
      redis-server:redis-server; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || [[ -x "/usr/sbin/${tool%%:*}" ]] || missing+=("${tool##*:}")
  done
  if (( ${#missing[@]} )); then
    echo "installing system packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if (( want_test )); then
  # A real single-node SLURM (with accounting, for QOS and sacct) for the managed-backend tests.
  slurm=../shared/slurm/start-single-node.sh
  if [[ -x $slurm || -f $slurm ]]; then
    SLURM_NODE_CPUS=8 bash "$slurm" --accounting | tail -n 1
  else
    echo "warning: $slurm not found: the SLURM tests will fail" >&2
  fi
fi

[[ -x .venv/bin/python ]] || python3 -m venv .venv
extras=""
(( want_test )) && extras="[test]"
stamp=".venv/.lmgate-installed${extras}"
digest=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$digest" ]]; then
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e ".${extras}"
  echo "$digest" > "$stamp"
fi
