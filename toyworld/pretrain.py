"""Makes the toy world's frozen models from scratch, deterministically from --seed:

    python -m toyworld.pretrain --out models/toy [--scenes 40000] [--vae-steps 1500] \
        [--sd-steps 3000] [--seed 0] [--overwrite]

- tokenizers: the test fixtures' CLIP (byte-level BPE) and T5 (unigram) pipelines with vocabularies
  of the toy captions, one token per word;
- `sd/vae`: an AutoencoderKL, 32x32x3 pixels <-> 8x8x8 latents, trained alone on squared
  error plus 1e-6 KL; its scaling_factor is 1 / the latents' std, as Stable Diffusion's;
- `sd/unet` and `sd/text_encoder`: a UNet2DConditionModel and a CLIP text encoder trained jointly
  from scratch on the epsilon loss with SD 1.5's noise schedule, 10% of captions emptied (for
  classifier-free guidance); the EMA weights are saved;
- `t5`: a random T5 encoder (gated GELU): the frozen "LLM" that ELLA learns to read.

`sd` is a diffusers Stable Diffusion folder (DPM-Solver++ scheduler) and `t5` a Hugging Face T5
folder, weights in float16. The whole of OUT is written at the end or not at all.
"""

import argparse
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from ella_jax.models.clip import CLIPTextConfig, CLIPTextEncoder
from ella_jax.models.t5 import T5Config, T5Encoder
from ella_jax.models.unet import UNet2DConditionModel, UNetConfig
from ella_jax.models.vae import AutoencoderKL, VAEConfig
from ella_jax.schedulers import SchedulerConfig, add_noise, alphas_cumprod
from ella_jax.storage import atomic_path
from ella_jax.text import load_tokenizer, tokenize
from ella_jax.weights.naming import params_to_torch
from ella_jax.weights.tensors import write_safetensors
from toyworld.scenes import generate

TEMPLATES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"
IMAGE_SIZE = 32
TOKEN_LENGTH = 32  # CLIP's max_position_embeddings here; ELLA's T5 token length in configs/toy.py
TEXT_WIDTH = 128  # CLIP hidden size = UNet cross_attention_dim = ELLA width
CAPTION_DROPOUT = 0.1

VAE = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [16, 32, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 8,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 1.0,  # replaced by 1 / std of the trained encoder's latents
    "force_upcast": False,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}
UNET = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 4,  # SD 1.x's quirk: the number of heads
    "block_out_channels": [64, 128],
    "cross_attention_dim": TEXT_WIDTH,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "in_channels": 8,
    "out_channels": 8,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "sample_size": IMAGE_SIZE // 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "use_linear_projection": False,
}
CLIP = {
    "architectures": ["CLIPTextModel"],
    "model_type": "clip_text_model",
    "hidden_size": TEXT_WIDTH,
    "intermediate_size": 4 * TEXT_WIDTH,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": TOKEN_LENGTH,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": TEXT_WIDTH,
}
T5 = {
    "architectures": ["T5EncoderModel"],
    "model_type": "t5",
    "d_model": 128,
    "d_kv": 32,
    "d_ff": 256,
    "num_layers": 2,
    "num_heads": 4,
    "feed_forward_proj": "gated-gelu",
    "dense_act_fn": "gelu_new",
    "is_gated_act": True,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "pad_token_id": 0,
    "eos_token_id": 1,
    "decoder_start_token_id": 0,
    "tie_word_embeddings": True,
}
SCHEDULER = {
    "_class_name": "DPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "linspace",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "lower_order_final": True,
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "feature_extractor": [None, None],
    "image_encoder": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_tokenizers(captions: list[str], sd: Path, t5: Path) -> None:
    """CLIP BPE into sd/tokenizer, T5 unigram into t5: the fixtures' pipelines, toy vocabularies."""
    clip = load_tokenizer(TEMPLATES / "sd" / "tokenizer")
    # 256 byte symbols, then merges up to whole words: the toy captions use about 50 words.
    clip = clip.train_new_from_iterator(captions, vocab_size=400)
    clip.model_max_length = TOKEN_LENGTH
    clip.save_pretrained(sd / "tokenizer")

    # The unigram trainer prunes a corpus this repetitive to word pieces, so the vocabulary is
    # written directly: every word whole, letters as the fallback for anything else.
    words = sorted({word for text in captions for word in text.split()})
    letters = "abcdefghijklmnopqrstuvwxyz"
    pipeline = json.loads((TEMPLATES / "t5" / "tokenizer.json").read_text())
    pipeline["model"]["vocab"] = (
        [["<pad>", 0.0], ["</s>", 0.0], ["<unk>", 0.0], ["\u2581", -20.0]]
        + [["\u2581" + word, -1.0] for word in words]
        + [[letter, -20.0] for letter in letters]
    )
    pipeline["model"]["unk_id"] = 2
    t5.mkdir(parents=True)
    (t5 / "tokenizer.json").write_text(json.dumps(pipeline, ensure_ascii=False))
    shutil.copy(TEMPLATES / "t5" / "tokenizer_config.json", t5 / "tokenizer_config.json")


def write_model(folder: Path, config: dict, params: Any, stem: str, prefix: str = "") -> None:
    """config.json and `stem`.safetensors (PyTorch names and layouts, float16)."""
    write_json(folder / "config.json", config)
    tensors = {prefix + n: t.astype(np.float16) for n, t in params_to_torch(params).items()}
    write_safetensors(tensors, folder / f"{stem}.safetensors", metadata={"format": "pt"})


def batches(arrays: dict[str, np.ndarray], batch_size: int, seed: int) -> Iterator[dict]:
    """Endless shuffled batches (epochs of one permutation each) of the arrays' first axis."""
    rng = np.random.default_rng(seed)
    count = len(next(iter(arrays.values())))
    while True:
        order = rng.permutation(count)
        for start in range(0, count - batch_size + 1, batch_size):
            rows = order[start : start + batch_size]
            yield {name: array[rows] for name, array in arrays.items()}


def fit(
    loss_fn: Callable[[Any, dict, jax.Array], jax.Array],
    params: Any,
    data: Iterator[dict],
    steps: int,
    learning_rate: float,
    seed: int,
    ema_decay: float,
    description: str,
) -> Any:
    """AdamW with warmup and gradient clipping for `steps` batches; returns the EMA params."""
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(optax.linear_schedule(0.0, learning_rate, min(200, steps)), weight_decay=0.01),
    )

    @jax.jit
    def train_step(state: tuple, batch: dict, rng: jax.Array) -> tuple[tuple, jax.Array]:
        params, ema, opt_state = state
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        return (params, ema, opt_state), loss

    state = (params, params, optimizer.init(params))
    key = jax.random.key(seed)
    progress = tqdm(range(steps), desc=description)
    losses = []
    for step in progress:
        state, loss = train_step(state, next(data), jax.random.fold_in(key, step))
        losses.append(loss)
        if step % 50 == 49:
            progress.set_postfix(loss=f"{float(jnp.mean(jnp.stack(losses))):.4f}")
            losses = []
    return state[1]


def train_vae(images: np.ndarray, steps: int, seed: int) -> tuple[AutoencoderKL, Any]:
    """images (N, 32, 32, 3) uint8 -> (model, EMA params)."""
    model = AutoencoderKL(VAEConfig.from_dict(VAE))
    params = model.init(jax.random.key(seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))["params"]

    def loss_fn(params: Any, batch: dict, rng: jax.Array) -> jax.Array:
        pixels = batch["image"].astype(jnp.float32) / 127.5 - 1.0
        mean, logvar = model.apply({"params": params}, pixels, method="encode")
        latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
        decoded = model.apply({"params": params}, latents, method="decode")
        kl = 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))
        return jnp.mean(jnp.square(decoded - pixels)) + 1e-6 * jnp.mean(kl)

    data = batches({"image": images}, 64, seed)
    return model, fit(loss_fn, params, data, steps, 1e-3, seed, 0.99, "vae")


def encode_images(model: AutoencoderKL, params: Any, images: np.ndarray) -> tuple[np.ndarray, ...]:
    """(mean, logvar), each (N, 8, 8, 8) float32, of uint8 images, in batches of 512."""
    encode = jax.jit(lambda x: model.apply({"params": params}, x / 127.5 - 1.0, method="encode"))
    parts = [encode(images[i : i + 512].astype(np.float32)) for i in range(0, len(images), 512)]
    return tuple(np.concatenate([np.asarray(p[k]) for p in parts]) for k in (0, 1))


def train_sd(
    clip_config: dict,
    latents: tuple[np.ndarray, np.ndarray],
    input_ids: np.ndarray,
    empty_ids: np.ndarray,
    scaling_factor: float,
    steps: int,
    seed: int,
) -> tuple[Any, Any]:
    """The UNet and CLIP text encoder trained jointly on latents (mean, logvar) (N, 8, 8, 8) and
    caption ids (N, TOKEN_LENGTH) -> (unet EMA params, text encoder EMA params)."""
    mean, logvar = latents
    unet = UNet2DConditionModel(UNetConfig.from_dict(UNET))
    clip = CLIPTextEncoder(CLIPTextConfig.from_dict(clip_config))
    unet_key, clip_key = jax.random.split(jax.random.key(seed))
    latent_shape = (1, *mean.shape[1:])
    params = {
        "unet": unet.init(
            unet_key, jnp.zeros(latent_shape), jnp.zeros((1,)), jnp.zeros((1, 1, TEXT_WIDTH))
        )["params"],
        "clip": clip.init(clip_key, jnp.zeros((1, TOKEN_LENGTH), jnp.int32))["params"],
    }
    cumprod = jnp.asarray(alphas_cumprod(SchedulerConfig.from_dict(SCHEDULER)))

    def loss_fn(params: Any, batch: dict, rng: jax.Array) -> jax.Array:
        latent_rng, noise_rng, time_rng, drop_rng = jax.random.split(rng, 4)
        size = batch["mean"].shape[0]
        drop = jax.random.uniform(drop_rng, (size, 1)) < CAPTION_DROPOUT
        ids = jnp.where(drop, empty_ids[None], batch["input_ids"])
        context = clip.apply({"params": params["clip"]}, ids)[0]
        noise_scale = jnp.exp(0.5 * batch["logvar"])
        latents = batch["mean"] + noise_scale * jax.random.normal(latent_rng, noise_scale.shape)
        latents = latents * scaling_factor
        noise = jax.random.normal(noise_rng, latents.shape)
        timesteps = jax.random.randint(time_rng, (size,), 0, cumprod.shape[0])
        noisy = add_noise(cumprod, latents, noise, timesteps)
        prediction = unet.apply({"params": params["unet"]}, noisy, timesteps, context)
        return jnp.mean(jnp.square(prediction - noise))

    data = batches({"mean": mean, "logvar": logvar, "input_ids": input_ids}, 64, seed)
    ema = fit(loss_fn, params, data, steps, 5e-4, seed, 0.995, "unet + text encoder")
    return ema["unet"], ema["clip"]


def pretrain(
    out: Path, scenes: int, vae_steps: int, sd_steps: int, seed: int, overwrite: bool
) -> dict:
    """Writes OUT/sd and OUT/t5 (see the module docstring); returns the summary also written to
    OUT/pretrain.json."""
    with atomic_path(out, overwrite=overwrite) as staging:
        sd, t5 = staging / "sd", staging / "t5"
        pairs = generate(seed, scenes, IMAGE_SIZE)
        images = np.stack([image for image, _ in pairs])
        captions = [text for _, text in pairs]
        write_tokenizers(captions, sd, t5)
        clip_tokenizer, t5_tokenizer = load_tokenizer(sd / "tokenizer"), load_tokenizer(t5)
        clip_config = CLIP | {
            "vocab_size": len(clip_tokenizer),
            "bos_token_id": clip_tokenizer.bos_token_id,
            "eos_token_id": clip_tokenizer.eos_token_id,
            "pad_token_id": clip_tokenizer.pad_token_id,
        }
        t5_config = T5 | {"vocab_size": len(t5_tokenizer)}

        vae, vae_params = train_vae(images, vae_steps, seed)
        mean, logvar = encode_images(vae, vae_params, images)
        scaling_factor = float(1.0 / mean.std())
        input_ids, _ = tokenize(clip_tokenizer, captions, TOKEN_LENGTH)
        empty_ids, _ = tokenize(clip_tokenizer, [""], TOKEN_LENGTH)
        unet_params, clip_params = train_sd(
            clip_config, (mean, logvar), input_ids, empty_ids[0], scaling_factor, sd_steps, seed
        )
        t5_model = T5Encoder(T5Config.from_dict(t5_config))
        t5_params = t5_model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]

        weights = "diffusion_pytorch_model"
        write_model(sd / "vae", VAE | {"scaling_factor": scaling_factor}, vae_params, weights)
        write_model(sd / "unet", UNET, unet_params, weights)
        write_model(sd / "text_encoder", clip_config, clip_params, "model")
        write_model(t5, t5_config, t5_params, "model")
        write_json(sd / "scheduler" / "scheduler_config.json", SCHEDULER)
        write_json(sd / "model_index.json", MODEL_INDEX)
        summary = {
            "command": f"python -m toyworld.pretrain --out {out} --scenes {scenes} "
            f"--vae-steps {vae_steps} --sd-steps {sd_steps} --seed {seed}",
            "scaling_factor": scaling_factor,
        }
        write_json(staging / "pretrain.json", summary)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.pretrain",
        description="Train the toy world's VAE, CLIP text encoder and UNet from scratch and write "
        "them, with a random T5 encoder, as OUT/sd (diffusers) and OUT/t5 (Hugging Face).",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--scenes", type=int, default=40000, help="training scenes (seed --seed)")
    parser.add_argument("--vae-steps", type=int, default=1500, help="VAE steps of batch 64")
    parser.add_argument("--sd-steps", type=int, default=3000, help="UNet steps of batch 64")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = parser.parse_args()
    summary = pretrain(
        args.out, args.scenes, args.vae_steps, args.sd_steps, args.seed, args.overwrite
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
