#!/usr/bin/env bash
# The main job on the embedded default: converts the small ELLA checkpoint shipped in
# tests/fixtures to a JAX directory and back, and runs the connector on it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
out="${1:-out/ella-tiny}"
python -m convert to-jax tests/fixtures/reference/ella.safetensors "$out" --heads 4 --overwrite
python -m convert to-torch "$out" "$out.safetensors" --overwrite
python -m convert info "$out"
