#!/usr/bin/env bash
# The README toy table's decoder-only row: ELLA trained on the toy world as the main job trains
# it (configs/toy.py), reading the random toy Llama (models/toy/llm, `python -m toyworld.toy_llm`)
# instead of the toy T5; its features made once (out/toy-llm-features), the run in out/toy-llm,
# its held-out scores in out/toy-llm/eval. The main job's scenes are reused (made if missing).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
scenes=out/toy-data/toyworld.array_record
llm=(--config.text_encoder.kind=llm --config.text_encoder.path=models/toy/llm)
if [ ! -f "$scenes" ]; then
  python -m toyworld.scenes --out out/toy-data --count 30000 --seed 2 --array-record \
    --hold-out configs/toy.py
fi
if [ ! -d out/toy-llm-features ]; then
  python -m train.precompute --config configs/toy.py --out out/toy-llm-features "${llm[@]}" \
    --config.data.source=array_record --config.data.path="$scenes" "$@"
fi
python -m train.main --config configs/toy.py --workdir out/toy-llm "${llm[@]}" \
  --config.data.path=out/toy-llm-features "$@"
python -m toyworld.evaluate --workdir out/toy-llm --overwrite
