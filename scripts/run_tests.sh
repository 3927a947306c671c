#!/usr/bin/env bash
# The test suite, from nothing: sets up .venv with the test extra, lints, runs pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh" test
ruff check .
# Two workers, each test module on one of them (its compiled models shared by its tests), in
# the order of collection (tests/conftest.py puts the heaviest first);
# ELLA_JAX_TEST_WORKERS=0 runs in this process. Arguments go to pytest.
python -m pytest -n "${ELLA_JAX_TEST_WORKERS:-2}" --dist loadscope --no-loadscope-reorder "$@"
