"""SUR-adapter for SD 1.5 as the official code trains it (Qrange-group/SUR-adapter 5d97aa3).

    python -m train.precompute --config configs/sur_sd15.py --out /data/surd-features \
        --config.sd=/models/stable-diffusion-v1-5 --config.t5=/models/flan-t5-xl \
        --config.data.path=/data/surd/metadata.jsonl
    python -m train.main --config configs/sur_sd15.py --workdir /ckpt/sur-sd15 \
        --config.sd=/models/stable-diffusion-v1-5 --config.data.path=/data/surd-features

Data: SURD's (image, simple caption, complex prompt) triples as a JSONL manifest
{"image", "caption": simple, "complex": complex} (or ArrayRecord records with the same fields).
Each value says where it comes from: [run.sh], [train] (SUR_adapter_train.py), [adapter]
(SUR_adapter.py), [spec] (../SUR_SPEC.md) or [ours]. The official options are the values named
in the comments; the defaults fix the official code's bugs.
"""

import ml_collections

from ella_jax.train.text_encoder import text_encoder_config


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "sur"
    c.sd = ""  # [ours] required: the SD 1.5 diffusers folder (text_encoder/, tokenizer/ used)
    c.t5 = ""  # [ours] the frozen LLM of train.precompute's vectors (official: LLaMA-13B [spec])
    # Official: LLaMA-13B's hidden state after block 40 [spec]: --config.text_encoder.path=
    # /models/llama-13b --config.text_encoder.layer=40 (empty path / dtype: c.t5 / c.t5_dtype).
    c.text_encoder = text_encoder_config()
    c.sur = ml_collections.ConfigDict(
        dict(
            depth=2,  # [run.sh]
            eta="0.1",  # [run.sh] adapter_weight; "learned": the course variant's per-prompt head
            initial_eta=0.1,  # [ours] where a learned eta starts
            attend="tokens",  # official "batch" [adapter] (batch_first=False): mixes the batch
            detach_unet_input=False,  # official True [train]: the MSE never reaches the adapter
            loss="kl",  # [train]; "cosine": the course variant
            lambda_llm=1e-5,  # [run.sh]
            lambda_cp=1e-5,  # [run.sh]
            temperature=1.0,  # [train]
            llm_vectors="",  # safetensors {caption: vector}; "": the precomputed folder's
            llm_pooling="mean",  # [ours] mean of the real tokens, or "last" (release: unstated)
            init="",  # a SUR-adapter to start from ("": random, fc zero [adapter])
        )
    )

    c.data = ml_collections.ConfigDict(
        dict(
            source="precomputed",  # [ours] manifest / array_record / precomputed (train.precompute)
            path="",
            resolution=512,  # [run.sh] resize, centre crop (random flip: not implemented)
            caption_dropout=0.0,  # [train] none
            max_skipped_fraction=0.5,  # [ours]
            read_threads=4,  # [ours]
            prefetch_batches=4,  # [ours]
        )
    )
    c.token_length = 128  # [ours] the LLM's tokens for train.precompute's vectors

    c.batch_size = 1  # [run.sh] train_batch_size 1 (the batch-axis attention sees one prompt)
    c.gradient_accumulation = 4  # [run.sh]: an update every 4 steps
    c.total_steps = 20_000  # [run.sh] 5000 updates x 4 accumulated steps
    c.learning_rate = 1e-5  # [run.sh] constant, no warmup
    c.lr_schedule = "constant"  # [run.sh]
    c.warmup_steps = 0  # [run.sh]
    c.weight_decay = 1e-2  # [train] AdamW defaults (0.9, 0.999, 1e-8, 1e-2)
    c.grad_clip = 1.0  # [run.sh] max_grad_norm
    c.ema_decay = 0.0  # [train] no EMA: the export is the trained params
    c.min_snr_gamma = 0.0  # [train] plain epsilon MSE
    c.dtype = "float16"  # [run.sh] mixed precision fp16 (float32 master params)
    c.remat = "none"
    c.t5_dtype = "float16"  # [spec] the official vectors are float16
    c.seed = 0

    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, rules=()))
    c.checkpoint_every = 2000
    c.keep_checkpoints = 3
    c.log_every = 100
    c.sample_every = 4000
    c.sample_prompts = ["A cat sitting on a sofa.", "A lighthouse on a cliff at dawn."]
    c.sample_steps = 50  # [spec] the official pipeline
    c.sample_guidance = 7.5  # [spec]
    c.export_dtype = "float32"
    return c
