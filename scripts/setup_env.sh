#!/usr/bin/env bash
# Creates .venv/ in the repository root and installs ella-jax into it (with the test extra when
# called with "test"). Skips the install when pyproject.toml has not changed since the last one.
# Source it: it leaves the caller in the repository root with .venv/bin on PATH (and JAX on the
# CPU unless JAX_PLATFORMS says otherwise).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
extra="${1:-}"
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed${extra:+-$extra}"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setting up .venv (ella-jax${extra:+[$extra]}) ..."
  if ! { .venv/bin/python -m pip install --upgrade pip &&
         .venv/bin/python -m pip install -e ".${extra:+[$extra]}"; } > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "setup failed: the full log is .venv/install.log" >&2
    exit 1
  fi
  echo "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
# The scripts' jobs are sized for a CPU. Where libtpu is installed (the test extra) on a host
# without a TPU, JAX would look for one at every command, and libtpu log its warnings.
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
