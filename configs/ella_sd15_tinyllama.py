"""ELLA for SD 1.5 on TinyLlama-1.1B, the decoder-only LLM of the paper's ablations (its TSC row:
DPG-Bench 72.91 with TinyLlama, against 71.70 with T5-XL and 63.18 for SD 1.5's CLIP).

    python -m train.main --config configs/ella_sd15_tinyllama.py --workdir /ckpt/ella-tinyllama \
        --config.sd=/models/stable-diffusion-v1-5 \
        --config.text_encoder.path=/models/TinyLlama-1.1B-intermediate-step-1431k-3T \
        --config.data.source=array_record --config.data.path='/data/shards/*.array_record'

Everything else is configs/ella_sd15_t5xl.py's recipe; the connector's input width follows the
LLM's (2048, as flan-t5-xl's). Which hidden state the paper read is not stated: the last one here
(`--config.text_encoder.layer=K` reads entry K, transformers' numbering).
"""

import ml_collections

from configs.ella_sd15_t5xl import get_config as t5xl_config
from ella_jax.train.text_encoder import text_encoder_config


def get_config() -> ml_collections.ConfigDict:
    c = t5xl_config()
    # [ours] required: the TinyLlama folder; float16 as the T5 recipe's features [paper]
    c.text_encoder = text_encoder_config(kind="llm", dtype="float16")
    return c
