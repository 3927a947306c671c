#!/usr/bin/env bash
# The test suite, from nothing: sets up .venv with the test extra, lints, runs pytest.
# Two pytest workers, a test file each at a time (PYTEST_WORKERS to change): XLA compiles on one
# thread, so on 2 cores two files at once take 12-13 minutes where one at a time takes 16.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
ruff check .
python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
