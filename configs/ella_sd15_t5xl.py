"""ELLA for SD 1.5 with flan-t5-xl, as the paper (arXiv 2403.05135) and the release describe it.

    python -m train.main --config configs/ella_sd15_t5xl.py --workdir /ckpt/ella-sd15 \
        --config.sd=/models/stable-diffusion-v1-5 --config.t5=/models/flan-t5-xl \
        --config.data.source=array_record --config.data.path='/data/shards/*.array_record'

Each value says where it comes from: [paper], [release] (the checkpoint's shapes, the reference
inference), [ip-adapter] (the trainer the authors said theirs derives from), or [ours].
"""

import ml_collections

from ella_jax.train.text_encoder import text_encoder_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.sd = ""  # [ours] required: the SD 1.5 diffusers folder
    c.t5 = ""  # [ours] required: the flan-t5-xl folder
    c.text_encoder = text_encoder_config()  # [ours] empty path / dtype: c.t5 / c.t5_dtype
    c.ella = ml_collections.ConfigDict(
        dict(time_channel=320, time_embed_dim=768, width=768, layers=6, heads=8, num_latents=64)
    )  # [release] shapes of ella-sd1.5-tsc-t5xl.safetensors; heads 8 [release code]
    c.ella_init = ""

    c.data = ml_collections.ConfigDict(
        dict(
            source="array_record",
            path="",
            resolution=512,  # [paper]
            caption_dropout=0.1,  # [ours] (issue default; ip-adapter uses 0.05)
            max_skipped_fraction=0.5,  # [ours] more unreadable images in a log interval: error
            captions=("txt",),  # [ours] webdataset: "txt", "json:FIELD"; several: one per step
            caption_weights=(),  # [ours] several captions: their weights by position (): uniform
            image_column="jpg",  # [ours] parquet: the encoded images' column (img2dataset's)
            caption_columns=("caption",),  # [ours] parquet: the captions' columns
            read_threads=4,  # [ours] threads per process, a batch each (<= prefetch_batches)
            prefetch_batches=4,  # [ours] batches read ahead per process (host memory)
        )
    )
    c.token_length = 128  # [paper] T5 features at 128 tokens
    c.mask_padding = False  # [release] the reference connector attends all 128 positions

    c.batch_size = 256  # [ours] not stated; 34 M pairs / ~140 k steps per epoch suggests ~256
    c.total_steps = 280_000  # [paper] steps of the released model
    c.learning_rate = 1e-4  # [paper] constant 1e-4 for SD 1.5
    c.lr_schedule = "constant"  # [paper]
    c.warmup_steps = 1000  # [ours]
    c.weight_decay = 0.01  # [paper] AdamW
    c.grad_clip = 1.0  # [ours]
    c.gradient_accumulation = 1  # [ours] steps whose gradients make one update (batch_size each)
    c.ema_decay = 0.9999  # [ours] the paper states no EMA; ella.safetensors exports the EMA
    c.min_snr_gamma = 0.0  # [ip-adapter] plain epsilon MSE
    c.dtype = "bfloat16"  # [ours] compute; float32 master params
    c.remat = "none"  # [ours] ~0.72 GiB a sample without (BENCHMARKS.md): 32 fit an 80 GB GPU
    c.t5_dtype = "float16"  # [paper] features were made with float16 T5
    c.seed = 0

    # [ours] 8 A100s [paper]: fsdp 8; rules: (regex, spec) partition rules (train/program.py)
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=8, rules=()))
    c.checkpoint_every = 5000
    c.keep_checkpoints = 3
    c.log_every = 100
    c.sample_every = 5000
    c.sample_prompts = [
        "A photo of a red book and a yellow vase on a wooden table, soft window light.",
        "Three small green frogs sitting on a wooden log near a pond at sunset.",
    ]
    c.sample_steps = 30
    c.sample_guidance = 7.5
    c.export_dtype = "float16"  # [release] the released file is float16
    return c
