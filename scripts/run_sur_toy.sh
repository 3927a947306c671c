#!/usr/bin/env bash
# The README's SUR-adapter table on the toy world, on the CPU: paraphrased training scenes
# (out/sur-toy-data) and their frozen VAE latents, T5 features and LLM vectors
# (out/sur-toy-features), made once; the SUR-adapter as released, with the gradient fixed and
# as the course variant, and ELLA trained on the same paraphrases; then the held-out scores
# (out/sur-eval). Rerunning resumes (a finished run only exports again).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
scenes=out/sur-toy-data/toyworld.array_record
if [ ! -f "$scenes" ]; then
  python -m toyworld.scenes --out out/sur-toy-data --count 30000 --seed 2 --array-record \
    --paraphrase
fi
if [ ! -d out/sur-toy-features ]; then
  python -m train.precompute --config configs/sur_toy.py --out out/sur-toy-features \
    --config.data.source=array_record --config.data.path="$scenes"
fi
python -m train.main --config configs/sur_toy.py --workdir out/sur-released \
  --config.sur.attend=batch --config.sur.detach_unet_input=True
python -m train.main --config configs/sur_toy.py --workdir out/sur-toy
python -m train.main --config configs/sur_toy.py --workdir out/sur-course \
  --config.sur.loss=cosine --config.sur.eta=learned
python -m train.main --config configs/toy.py --workdir out/ella-para \
  --config.data.path=out/sur-toy-features --config.token_length=64
python -m toyworld.evaluate_sur --out out/sur-eval \
  --sur "SUR-adapter as released (batch attention, UNet input detached, KL)=out/sur-released" \
  --sur "SUR-adapter, gradient and attention fixed (KL)=out/sur-toy" \
  --sur "course variant (cosine, learned eta)=out/sur-course" \
  --ella "ELLA trained on the paraphrases=out/ella-para"
