"""The released backbones' configs, as their `config.json` files hold them (SD 1.5's UNet, VAE and
scheduler, SDXL base's UNet, VAE, scheduler and second text encoder, flan-t5-xl's encoder,
TinyLlama-1.1B) and the released ELLA's shapes; `write_folders` lays them out as the model
folders the loaders read, config files only, for compiling with their shapes (`train.aot`) and
for the benchmarks that build them with random weights."""

import json
import os

from etils import epath

from ella_jax import storage

SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "use_linear_projection": False,
}
FLAN_T5_XL = {
    "d_model": 2048,
    "d_ff": 5120,
    "d_kv": 64,
    "num_heads": 32,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "is_encoder_decoder": False,
    "use_cache": False,
}
# stabilityai/stable-diffusion-xl-base-1.0's unet/config.json.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
}
# TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T (the paper's TinyLlama ablation's model).
TINYLLAMA = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}
# SD 1.5's scheduler (as in stable-diffusion-v1-5/scheduler, DPM-Solver++ as ELLA samples).
SD15_SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
}
# The released ELLA (ella-sd1.5-tsc-t5xl): `ella_jax.ELLA`'s defaults, `bench.torch_ella`'s.
ELLA_SD15 = dict(
    time_channel=320,
    time_embed_dim=768,
    width=768,
    layers=6,
    heads=8,
    num_latents=64,
    input_dim=2048,
)

# ELLA at SDXL's width, as configs/ella_sdxl_t5xl.py trains it.
ELLA_SDXL = dict(
    time_channel=320,
    time_embed_dim=2048,
    width=2048,
    layers=6,
    heads=16,
    num_latents=64,
    input_dim=2048,
)
SD15_SCALING_FACTOR, SDXL_SCALING_FACTOR = 0.18215, 0.13025
SDXL_VAE = {**SD15_VAE, "sample_size": 1024, "scaling_factor": SDXL_SCALING_FACTOR,
            "force_upcast": True}  # fmt: skip
# stabilityai/stable-diffusion-xl-base-1.0's text_encoder_2/config.json (OpenCLIP bigG).
SDXL_TEXT_ENCODER_2 = {
    "architectures": ["CLIPTextModelWithProjection"],
    "model_type": "clip_text_model",
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "vocab_size": 49408,
    "layer_norm_eps": 1e-5,
    "eos_token_id": 2,
}
SDXL_SCHEDULER = {**SD15_SCHEDULER, "_class_name": "EulerDiscreteScheduler"}
SDXL_SCHEDULER = {
    k: v for k, v in SDXL_SCHEDULER.items() if k not in ("algorithm_type", "solver_order")
}

# Each released model folder, file by file (paths relative to the folder).
SD15, SDXL, FLAN_T5 = "stable-diffusion-v1-5", "stable-diffusion-xl-base-1.0", "flan-t5-xl"
FOLDERS = {
    SD15: {
        "unet/config.json": SD15_UNET,
        "vae/config.json": SD15_VAE,
        "scheduler/scheduler_config.json": SD15_SCHEDULER,
    },
    SDXL: {
        "unet/config.json": SDXL_UNET,
        "vae/config.json": SDXL_VAE,
        "scheduler/scheduler_config.json": SDXL_SCHEDULER,
        "text_encoder_2/config.json": SDXL_TEXT_ENCODER_2,
        "model_index.json": {"force_zeros_for_empty_prompt": True},
    },
    FLAN_T5: {"config.json": {"model_type": "t5", **FLAN_T5_XL}},
    "TinyLlama-1.1B": {"config.json": TINYLLAMA},
}


def write_folders(root: str | os.PathLike) -> epath.Path:
    """Writes every released model's folder, config files only, under `root` (ROOT/NAME for
    each name of FOLDERS); returns `root`."""
    root = storage.path(root)
    for name, files in FOLDERS.items():
        for relative, content in files.items():
            path = root / name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(content, indent=2) + "\n")
    return root
