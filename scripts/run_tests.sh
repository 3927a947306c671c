#!/usr/bin/env bash
# The test suite, from nothing: sets up .venv with the test extra, lints, runs pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
ruff check .
python -m pytest "$@"
