"""The embedded default: ELLA trained on the toy world (`toyworld/`), on a 2-core CPU.

    bash scripts/run_main.sh     # = the commands below

    python -m toyworld.scenes --out out/toy-data --count 30000 --seed 2 --array-record \
        --hold-out configs/toy.py
    python -m train.precompute --config configs/toy.py --out out/toy-features \
        --config.data.source=array_record --config.data.path=out/toy-data/toyworld.array_record
    python -m train.main --config configs/toy.py --workdir out/toy
    python -m toyworld.evaluate --workdir out/toy

The frozen models are the toy Stable Diffusion and the random toy T5 that `toyworld.pretrain`
made and the repository ships (models/toy). ELLA learns to turn the T5's features into the
context the toy UNet was trained on (its CLIP text encoder's); `toyworld.evaluate` then scores
what the UNet draws for held-out captions, in two splits: captions of combinations the
training scenes had, and captions stating a combination of `hold_out`, which no training scene
contains (the toy SD saw them all: its row is the ceiling of both). About 14 minutes on 2 cores
(9.5 of them training).
"""

from pathlib import Path

import ml_collections

from ella_jax.train.text_encoder import text_encoder_config

# The models and data this repository ships: found wherever the command runs.
REPOSITORY = Path(__file__).resolve().parents[1]


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # diffusers folder: unet/, vae/, scheduler/ (+ text_encoder/)
    c.sd = str(REPOSITORY / "models/toy/sd")
    # Hugging Face T5 folder (random weights: the frozen "LLM")
    c.t5 = str(REPOSITORY / "models/toy/t5")
    # The frozen text model; empty path / dtype: c.t5 / c.t5_dtype (ella_jax/train/text_encoder.py).
    c.text_encoder = text_encoder_config()
    c.ella = ml_collections.ConfigDict(
        dict(time_channel=64, time_embed_dim=128, width=128, layers=2, heads=4, num_latents=32)
    )  # width = the toy UNet's cross_attention_dim
    c.ella_init = ""

    c.data = ml_collections.ConfigDict(
        dict(
            # The frozen VAE's latent moments and T5's features of the scenes, made once by
            # train.precompute: the steps then run ELLA and the UNet only.
            source="precomputed",
            path="out/toy-features",
            resolution=32,
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
    # Combinations no training scene of ELLA contains (toyworld.scenes --hold-out, applied when
    # the training shard is written; toyworld.scenes.HoldOut): 3 of the 18 colour-shape pairs,
    # 3 of the 27 shape-cell placements, 3 of the 36 shape-relation-shape triples. Each word
    # stays in training in other combinations.
    c.hold_out = ml_collections.ConfigDict(
        dict(
            colour_shape=("red triangle", "green circle", "blue square"),
            shape_position=("circle top left", "square bottom right", "triangle center"),
            relation=("square left circle", "triangle above square", "circle below triangle"),
        )
    )

    # The toy captions are short: the connector reads 32 tokens with the padding masked
    # (ELLAPipeline's flexible mode), not the reference's 128 unmasked.
    c.token_length = 32
    c.mask_padding = True

    # 750 steps fit the main job in 15 minutes on a 2-core AVX2 host (0.76 s a step); 1600 steps
    # score higher and take twice as long (README).
    c.batch_size = 64
    c.total_steps = 750
    c.learning_rate = 3e-3
    c.lr_schedule = "cosine"
    c.warmup_steps = 50
    c.weight_decay = 0.01
    c.grad_clip = 1.0
    c.gradient_accumulation = 1  # steps whose gradients make one update
    c.ema_decay = 0.99
    c.min_snr_gamma = 0.0
    c.dtype = "float32"
    c.remat = "none"
    c.t5_dtype = "float32"
    c.seed = 0

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=()))
    c.checkpoint_every = 250
    c.keep_checkpoints = 1
    c.log_every = 50
    c.sample_every = 250
    c.sample_prompts = [
        "a red square",
        "two blue circles",
        "a green triangle in the top left",
        "a yellow circle to the left of a magenta square",
        "three cyan squares",
        "a blue square above a red circle",
        "a magenta triangle at the bottom",
        "",
    ]
    c.sample_steps = 20
    c.sample_guidance = 3.0
    c.export_dtype = "float32"
    return c
