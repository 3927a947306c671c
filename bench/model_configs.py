"""The device suite's shapes (the released backbones' configs are `ella_jax.weights.released`'s),
for the benchmarks that build them with random weights; no torch needed."""

from ella_jax.weights.released import (
    ELLA_SD15,
    ELLA_SDXL,
    SD15_SCALING_FACTOR,
    SD15_SCHEDULER,
    SD15_UNET,
    SDXL_SCALING_FACTOR,
    SDXL_UNET,
)


def pooled_width(unet_config: dict) -> int | None:
    """The width of SDXL's pooled text embedding a UNet config takes (its added conditions);
    None for a UNet without them."""
    if unet_config.get("addition_embed_type") != "text_time":
        return None
    time_ids = 6 * unet_config["addition_time_embed_dim"]
    return unet_config["projection_class_embeddings_input_dim"] - time_ids


# The device suite's shapes (bench.device_suite): SD 1.5 at 512 px, SDXL at 1024 px (sampled
# with DPM-Solver++ on its own betas, which are SD 1.5's), and tiny ones of each for a CPU.
SUITE_FULL = dict(
    unet=SD15_UNET,
    ella=ELLA_SD15,
    scheduler=SD15_SCHEDULER,
    scaling_factor=SD15_SCALING_FACTOR,
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
    scaling_factor=SD15_SCALING_FACTOR,
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
    scaling_factor=SDXL_SCALING_FACTOR,
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
    scaling_factor=SDXL_SCALING_FACTOR,
)
# The suite's shapes by its --model, full and --small.
SUITES = {"sd15": (SUITE_FULL, SUITE_SMALL), "sdxl": (SUITE_SDXL, SUITE_SDXL_SMALL)}
