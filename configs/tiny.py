"""The tests' run: ELLA trained on the tiny models of tests/fixtures and data/tiny, on CPU.

    .venv/bin/python -m train.main --config configs/tiny.py --workdir out/tiny

Ends by itself in about a minute on 2 cores (60 steps of batch 8 at 16x16 pixels), writing
out/tiny/{metrics.jsonl, events.*, samples/, checkpoints/, ella.safetensors, ella_config.json}.
The frozen UNet and T5 are random (test fixtures), so samples are noise; the loss still falls.
"""

from pathlib import Path

import ml_collections

from ella_jax.train.text_encoder import text_encoder_config

# The models and data this repository ships: found wherever the command runs.
REPOSITORY = Path(__file__).resolve().parents[1]


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # diffusers folder: unet/, vae/, scheduler/, text_encoder/
    c.sd = str(REPOSITORY / "tests/fixtures/reference/sd")
    c.t5 = str(REPOSITORY / "tests/fixtures/reference/t5")  # Hugging Face T5 folder
    # The frozen text model; empty path / dtype: c.t5 / c.t5_dtype (ella_jax/train/text_encoder.py).
    c.text_encoder = text_encoder_config()
    c.ella = ml_collections.ConfigDict(
        dict(time_channel=32, time_embed_dim=64, width=64, layers=2, heads=4, num_latents=16)
    )  # input_dim is the T5's d_model; width must be the UNet's cross_attention_dim
    c.ella_init = ""  # an ELLA checkpoint to start from ("": random init)

    c.data = ml_collections.ConfigDict(
        dict(
            source="manifest",
            path=str(REPOSITORY / "data/tiny/captions.jsonl"),
            resolution=16,
            caption_dropout=0.1,
            max_skipped_fraction=0.5,  # more unreadable images in a logging interval: an error
            captions=("txt",),  # webdataset: "txt", "json:FIELD"; several: one per step
            caption_weights=(),  # several captions: their weights, by position; (): uniform
            image_column="jpg",  # parquet: the encoded images' column (img2dataset's name)
            caption_columns=("caption",),  # parquet: the captions' columns; several: as above
            read_threads=4,  # threads per process, a batch each (<= prefetch_batches)
            prefetch_batches=4,  # batches read ahead per process (host memory)
        )
    )
    c.token_length = 128
    c.mask_padding = False  # True: ELLA ignores padded T5 tokens

    c.batch_size = 8  # global
    c.total_steps = 60
    c.learning_rate = 1e-3
    c.lr_schedule = "constant"
    c.warmup_steps = 5
    c.weight_decay = 0.01
    c.grad_clip = 1.0
    c.gradient_accumulation = 1  # steps whose gradients make one update
    c.ema_decay = 0.9
    c.min_snr_gamma = 0.0
    c.dtype = "float32"  # ELLA / UNet / VAE compute; ELLA's master params are always float32
    c.remat = "none"  # "blocks": the UNet's blocks are recomputed in the backward pass
    c.t5_dtype = "float32"
    c.seed = 0

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=()))
    c.checkpoint_every = 20
    c.keep_checkpoints = 2
    c.log_every = 10
    c.sample_every = 30
    c.sample_prompts = ["a red square in the top left on a blue background", ""]
    c.sample_steps = 8
    c.sample_guidance = 7.5
    c.export_dtype = "float32"
    return c
