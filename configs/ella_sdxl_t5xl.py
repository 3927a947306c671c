"""ELLA for SDXL with flan-t5-xl: ELLA-SDXL, whose weights were never released (the paper's best
DPG-Bench result, 80.23 against SDXL's 74.65).

    python -m train.main --config configs/ella_sdxl_t5xl.py --workdir /ckpt/ella-sdxl \
        --config.sd=/models/stable-diffusion-xl-base-1.0 --config.t5=/models/flan-t5-xl \
        --config.data.source=array_record --config.data.path='/data/shards/*.array_record'

configs/ella_sd15_t5xl.py's recipe with SDXL's changes; each value says where it comes from:
[paper], [issue] (this project's issue 19), [ours]. The UNet's added conditions come from the
frozen `text_encoder_2` (its projected pooled embedding of the caption) and each image's sizes
(original height and width, the crop's top-left, 1024 x 1024): images are resized and
centre-cropped, not bucketed by aspect ratio [ours]. `train.precompute` writes the pooled
embeddings and time ids too (then `--config.data.source=precomputed`).
"""

import ml_collections

from configs.ella_sd15_t5xl import get_config as sd15_config


def get_config() -> ml_collections.ConfigDict:
    c = sd15_config()
    c.sd = ""  # [ours] required: the SDXL base diffusers folder (text_encoder_2/, tokenizer_2/)
    # [ours] the connector at SDXL's cross-attention width; its other shapes are not published
    c.ella = ml_collections.ConfigDict(
        dict(time_channel=320, time_embed_dim=2048, width=2048, layers=6, heads=16, num_latents=64)
    )
    c.data.resolution = 1024  # [issue] SDXL's native size
    c.learning_rate = 1e-5  # [paper] 1e-5 for SDXL
    c.remat = "blocks"  # [ours] SDXL's UNet at 1024 px: recompute its blocks (memory unmeasured)
    c.sample_steps = 30
    return c
