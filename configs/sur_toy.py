"""SUR-adapter on the toy world (`toyworld/`): paraphrases in words the toy SD's text encoder
never saw are the simple prompts, the template captions the complex ones.

    python -m toyworld.scenes --out out/sur-toy-data --count 30000 --seed 2 --array-record \
        --paraphrase
    python -m train.precompute --config configs/sur_toy.py --out out/sur-toy-features \
        --config.data.source=array_record --config.data.path=out/sur-toy-data/toyworld.array_record
    python -m train.main --config configs/sur_toy.py --workdir out/sur-toy
    python -m toyworld.evaluate_sur --out out/sur-eval --sur "SUR=out/sur-toy"

`bash scripts/run_sur_toy.sh` runs these and the README table's other rows.

The frozen models are the shipped toy SD and, as the "LLM" whose pooled features SUR distils,
the random toy T5 (`train.precompute` writes one vector per paraphrase). The defaults are the
fixed recipe (attention over tokens, the MSE reaching the adapter, the official KL losses and
weights); the README's table names the overrides of the other rows.
"""

from pathlib import Path

import ml_collections

from ella_jax.train.text_encoder import text_encoder_config

# The models and data this repository ships: found wherever the command runs.
REPOSITORY = Path(__file__).resolve().parents[1]


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "sur"
    c.sd = str(REPOSITORY / "models/toy/sd")
    c.t5 = str(REPOSITORY / "models/toy/t5")  # the frozen "LLM" of train.precompute's vectors
    c.text_encoder = text_encoder_config()  # empty path / dtype: c.t5 / c.t5_dtype
    c.sur = ml_collections.ConfigDict(
        dict(
            depth=2,
            eta="0.1",  # official 0.1; "learned": the course variant
            initial_eta=0.1,
            attend="tokens",  # official "batch"
            detach_unet_input=False,  # official True
            loss="kl",  # official; "cosine": the course variant
            lambda_llm=1e-5,  # official
            lambda_cp=1e-5,  # official
            temperature=1.0,
            llm_vectors="",  # "": the precomputed folder's llm_vectors.safetensors
            llm_pooling="mean",  # [ours] mean of the real tokens, or "last" (release: unstated)
            init="",
        )
    )
    c.data = ml_collections.ConfigDict(
        dict(
            source="precomputed",
            path="out/sur-toy-features",
            resolution=32,
            caption_dropout=0.0,  # official: none
            max_skipped_fraction=0.5,
            read_threads=4,
            prefetch_batches=4,
        )
    )
    c.token_length = 64  # the toy T5 spells unseen words by letters: paraphrases reach 57 tokens

    c.batch_size = 64
    c.gradient_accumulation = 1
    c.total_steps = 600
    c.learning_rate = 1e-3
    c.lr_schedule = "cosine"
    c.warmup_steps = 50
    c.weight_decay = 0.01
    c.grad_clip = 1.0
    c.ema_decay = 0.0  # official: no EMA
    c.min_snr_gamma = 0.0
    c.dtype = "float32"
    c.remat = "none"
    c.t5_dtype = "float32"
    c.seed = 0

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=()))
    c.checkpoint_every = 300
    c.keep_checkpoints = 1
    c.log_every = 50
    c.sample_every = 300
    c.sample_prompts = [
        "a crimson box",
        "a pair of azure discs",
        "an emerald wedge toward the northwest",
        "a golden disc west of a fuchsia box",
        "a trio of teal blocks",
        "",
    ]
    c.sample_steps = 20
    c.sample_guidance = 3.0
    c.export_dtype = "float32"
    return c
