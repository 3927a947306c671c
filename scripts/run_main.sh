#!/usr/bin/env bash
# The main job on the embedded default: trains ELLA with configs/tiny.py (tiny models and data
# that ship in the repository) on the CPU, into out/tiny. Rerunning resumes; extra arguments go
# to train.main (e.g. --config.total_steps=200).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
python -m train.main --config configs/tiny.py --workdir out/tiny "$@"
