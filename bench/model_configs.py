"""The backbones' real configs, as their `config.json` files hold them (SD 1.5's UNet and VAE,
flan-t5-xl's encoder, TinyLlama-1.1B), for the benchmarks that build them with random weights;
no torch needed."""

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


def pooled_width(unet_config: dict) -> int | None:
    """The width of SDXL's pooled text embedding a UNet config takes (its added conditions);
    None for a UNet without them."""
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    time_ids = 6 * unet_config["addition_time_embed_dim"]
    return unet_config["projection_class_embeddings_input_dim"] - time_ids


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

# The device suite's shapes (bench.device_suite): SD 1.5 at 512 px, SDXL at 1024 px (sampled
# with DPM-Solver++ on its own betas, which are SD 1.5's), and tiny ones of each for a CPU.
SUITE_FULL = dict(
    unet=SD15_UNET,
    ella=ELLA_SD15,
    scheduler=SD15_SCHEDULER,
    scaling_factor=0.18215,
    resolution=512,
    tokens=128,
    train_batches=(8, 16, 32, 64),
    train_steps=10,
    sample_batches=(1, 8),
    sample_steps=50,
)
SUITE_SMALL = dict(
    unet={
        **SD15_UNET,
        "sample_size": 8,
        "block_out_channels": [32],
        "down_block_types": ["CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": 64,
        "norm_num_groups": 8,
    },
    ella=dict(
        time_channel=32,
        time_embed_dim=64,
        width=64,
        layers=2,
        heads=4,
        num_latents=16,
        input_dim=96,
    ),
    scheduler=SD15_SCHEDULER,
    scaling_factor=0.18215,
    resolution=64,
    tokens=16,
    train_batches=(2, 4),
    train_steps=3,
    sample_batches=(1, 2),
    sample_steps=4,
)
SUITE_SDXL = dict(
    SUITE_FULL,
    unet=SDXL_UNET,
    ella=ELLA_SDXL,
    scaling_factor=0.13025,
    resolution=1024,
    train_batches=(4, 8, 16, 32),
    sample_batches=(1, 4),
)
SUITE_SDXL_SMALL = dict(
    SUITE_SMALL,
    unet={
        **SDXL_UNET,
        "sample_size": 8,
        "block_out_channels": [32, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": [2, 4],
        "transformer_layers_per_block": [1, 2],
        "cross_attention_dim": 64,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,  # pooled embeddings of width 32
        "norm_num_groups": 8,
    },
    scaling_factor=0.13025,
)
# The suite's shapes by its --model, full and --small.
SUITES = {"sd15": (SUITE_FULL, SUITE_SMALL), "sdxl": (SUITE_SDXL, SUITE_SDXL_SMALL)}
