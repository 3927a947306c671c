#!/usr/bin/env bash
# The main job on the embedded default: trains ELLA on the toy world (configs/toy.py) on the CPU,
# into out/toy, then scores what the frozen toy UNet draws for held-out captions, with the toy
# DPG-Bench among the scores (out/toy/eval).
# The training scenes (out/toy-data) and their frozen VAE latents and T5 features
# (out/toy-features) are made once. Rerunning resumes the training; extra arguments are config
# overrides for train.precompute and train.main (e.g. --config.total_steps=200); train.main
# refuses features made for another token length, image size or T5 dtype.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
scenes=out/toy-data/toyworld.array_record
if [ ! -f "$scenes" ]; then
  python -m toyworld.scenes --out out/toy-data --count 30000 --seed 2 --array-record \
    --hold-out configs/toy.py  # configs/toy.py's hold_out: combinations ELLA never trains on
fi
if [ ! -d out/toy-features ]; then
  python -m train.precompute --config configs/toy.py --out out/toy-features \
    --config.data.source=array_record --config.data.path="$scenes" "$@"
fi
python -m train.main --config configs/toy.py --workdir out/toy "$@"
python -m toyworld.evaluate --workdir out/toy --overwrite  # rerun: scores the resumed run anew
