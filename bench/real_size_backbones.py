"""The frozen backbones at their real sizes with random weights: Flax ports against PyTorch.

    .venv/bin/python -m bench.real_size_backbones [--only unet|sdxl|t5|llm|vae] [--repeats 3]
        [--sdxl-resolution 256|1024]

Each check builds the reference (diffusers / transformers) from the real config with random
weights, runs it, saves it with `save_pretrained` to a temporary folder and frees it, then loads
the folder with this project's loader and runs the jitted port on the same inputs:

    unet  SD 1.5 UNet (~860M parameters): latents (2, 16, 16, 4), timesteps [999, 250],
          context (2, 77, 768)
    sdxl  SDXL base UNet (~2.6B parameters, 10.3 GB in float32): latents (1, 32, 32, 4)
          (--sdxl-resolution 1024: (1, 128, 128, 4), SDXL's own size, minutes a forward),
          timestep 500, context (1, 77, 2048), pooled (1, 1280), time ids for 1024 px
    t5    flan-t5-xl encoder (~1.2B parameters, 4.9 GB in float32): 2 x 16 token ids, the second
          with 9 real tokens; compared on the real tokens
    llm   TinyLlama-1.1B (Llama, grouped-query attention; 4.4 GB in float32): the same token
          layout, hidden states 11 and 22 (the last, after the final norm) on the real tokens
    vae   SD 1.5 VAE (~84M parameters): decode (1, 8, 8, 4) -> (1, 64, 64, 3), encode
          (1, 64, 64, 3) -> mean, logvar

All in float32 on the CPU. Prints one line per check: the relative error
max|jax - torch| / max|torch| and the median forward time of each (JAX jitted, after
compilation; PyTorch eager under `torch.inference_mode()`). Exits 1 if any relative error
exceeds 1e-4. Peak memory is about 19 GiB, in the SDXL check (measured 19.2 GiB); run the
parts one at a time with `--only`.
Needs the test extra (torch, diffusers, transformers).
"""

import argparse
import functools
import gc
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench.timing import median_seconds
from ella_jax.weights.diffusers import load_unet, load_vae
from ella_jax.weights.llm import load_llm
from ella_jax.weights.released import FLAN_T5_XL, SD15_UNET, SD15_VAE, SDXL_UNET, TINYLLAMA
from ella_jax.weights.t5 import load_t5_encoder

TOLERANCE = 1e-4


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    """max|ours - reference| / max|reference|."""
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    if ours.shape != reference.shape:
        raise ValueError(f"shape {ours.shape} against the reference's {reference.shape}")
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int, constant_only: bool = False) -> None:
    """Adds noise to the parameters in place, so that no path is silenced by an initial value:
    0.1 x its std to a random tensor, N(0, 0.05) to a constant one (norm scales and shifts,
    zero biases). `constant_only` leaves the random tensors as they are."""
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        flat = param.view(-1)
        constant = bool((flat == flat[0]).all())
        if constant_only and not constant:
            continue
        std = 0.05 if constant else 0.1 * float(param.std())
        param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype), alpha=std)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def run_jitted(
    apply: Callable, params: dict, inputs: tuple, repeats: int
) -> tuple[np.ndarray, float, float]:
    """(output, median seconds, compile seconds) of `jax.jit(apply)({"params": params}, *inputs)`,
    compiled ahead of the timed calls."""
    start = time.perf_counter()
    compiled = jax.jit(apply).lower({"params": params}, *inputs).compile()
    compile_s = time.perf_counter() - start
    ours = np.asarray(compiled({"params": params}, *inputs))
    seconds = median_seconds(
        lambda: compiled({"params": params}, *inputs).block_until_ready(), repeats
    )
    return ours, seconds, compile_s


def timing(jax_s: float, torch_s: float) -> str:
    return f"JAX jit {1e3 * jax_s:8.1f} ms, torch {1e3 * torch_s:8.1f} ms"


def reference_unet(
    folder: str, config: dict, inputs: tuple[np.ndarray, ...], repeats: int
) -> tuple[np.ndarray, float, float]:
    """diffusers' UNet of `config` with random (perturbed) weights, saved to `folder`: its NHWC
    output on `inputs` (NHWC latents, timesteps, context, and SDXL's text_embeds and time_ids),
    its median forward seconds and its millions of parameters. The model is freed on return."""
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(0)
    reference = TorchUNet(**config).eval()
    perturb_(reference, seed=1)
    latents, timesteps, context, *added = (torch.from_numpy(a) for a in inputs)
    kwargs = {}
    if added:
        kwargs["added_cond_kwargs"] = {"text_embeds": added[0], "time_ids": added[1]}
    args = (latents.permute(0, 3, 1, 2).contiguous(), timesteps, context)
    with torch.inference_mode():
        expected = reference(*args, **kwargs).sample.numpy().transpose(0, 2, 3, 1).copy()
        torch_s = median_seconds(lambda: reference(*args, **kwargs), repeats)
    reference.save_pretrained(folder, safe_serialization=True)
    return expected, torch_s, count_parameters(reference) / 1e6


def compare_unet(name: str, config: dict, inputs: tuple[np.ndarray, ...], repeats: int) -> float:
    """The relative error of the port against diffusers on `inputs` (see `reference_unet`)."""
    with tempfile.TemporaryDirectory(prefix="unet.") as folder:
        expected, torch_s, millions = reference_unet(folder, config, inputs, repeats)
        gc.collect()
        model, params = load_unet(folder)
    ours, jax_s, compile_s = run_jitted(
        model.apply, params, tuple(jnp.asarray(a) for a in inputs), repeats
    )
    error = relative_error(ours, expected)
    latents, _, context, *_ = inputs
    print(
        f"unet  {name} ({millions:.0f}M), B={latents.shape[0]} {latents.shape[1]}x"
        f"{latents.shape[2]} latents, {context.shape[1]} tokens: rel err {error:.2e} | "
        f"{timing(jax_s, torch_s)} (JAX compile {compile_s:.0f} s)",
        flush=True,
    )
    return error


def check_unet(repeats: int) -> list[float]:
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 16, 16, 4), dtype=np.float32)  # NHWC
    timesteps = np.array([999.0, 250.0], np.float32)
    context = rng.standard_normal((2, 77, 768), dtype=np.float32)
    return [compare_unet("SD 1.5 UNet", SD15_UNET, (latents, timesteps, context), repeats)]


def check_sdxl_unet(repeats: int, resolution: int = 256) -> list[float]:
    """SDXL's UNet at `resolution` px (latents of an eighth of it; 1024 px, SDXL's own, is 16
    times 256 px's work and minutes a forward on a CPU), its added conditions included."""
    rng = np.random.default_rng(0)
    latent = resolution // 8
    latents = rng.standard_normal((1, latent, latent, 4), dtype=np.float32)  # NHWC
    timesteps = np.array([500.0], np.float32)
    context = rng.standard_normal((1, 77, 2048), dtype=np.float32)
    text_embeds = rng.standard_normal((1, 1280), dtype=np.float32)
    time_ids = np.array([[1024, 1024, 0, 0, 1024, 1024]], np.float32)
    inputs = (latents, timesteps, context, text_embeds, time_ids)
    return [compare_unet("SDXL UNet", SDXL_UNET, inputs, repeats)]


def reference_t5(
    folder: str, input_ids: np.ndarray, mask: np.ndarray, repeats: int
) -> tuple[np.ndarray, float, float]:
    """transformers' T5 encoder with random weights (norm scales perturbed), saved to `folder`:
    its last hidden state, its median forward seconds and its billions of parameters. The model
    is freed on return, so only one copy of the 4.9 GB of weights is alive at a time."""
    from transformers import T5Config as TorchT5Config
    from transformers import T5EncoderModel

    torch.manual_seed(0)
    reference = T5EncoderModel(TorchT5Config(**FLAN_T5_XL)).eval()
    perturb_(reference, seed=1, constant_only=True)  # the RMS norm scales (all ones)
    ids, attention_mask = torch.from_numpy(input_ids), torch.from_numpy(mask)
    with torch.inference_mode():
        run = lambda: reference(input_ids=ids, attention_mask=attention_mask)  # noqa: E731
        expected = run().last_hidden_state.numpy().copy()
        torch_s = median_seconds(run, repeats)
    reference.save_pretrained(folder, safe_serialization=True)
    return expected, torch_s, count_parameters(reference) / 1e9


TOKENS, REAL_TOKENS = 16, (16, 9)


def padded_tokens(vocab_size: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) int64 (2, TOKENS): random ids, the second row right-padded
    with `pad` after REAL_TOKENS[1]."""
    rng = np.random.default_rng(0)
    input_ids = rng.integers(3, vocab_size, (2, TOKENS)).astype(np.int64)
    mask = (np.arange(TOKENS)[None, :] < np.array(REAL_TOKENS)[:, None]).astype(np.int64)
    input_ids[mask == 0] = pad
    return input_ids, mask


def check_t5(repeats: int) -> list[float]:
    input_ids, mask = padded_tokens(FLAN_T5_XL["vocab_size"], pad=0)

    with tempfile.TemporaryDirectory(prefix="t5.") as folder:
        expected, torch_s, billions = reference_t5(folder, input_ids, mask, repeats)
        gc.collect()
        model, params = load_t5_encoder(folder)

    inputs = (jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    ours, jax_s, compile_s = run_jitted(model.apply, params, inputs, repeats)
    real_tokens = mask.astype(bool)
    error = relative_error(ours[real_tokens], expected[real_tokens])
    print(
        f"t5    flan-t5-xl encoder ({billions:.2f}B), B=2 x {TOKENS} tokens ({REAL_TOKENS[0]} "
        f"and {REAL_TOKENS[1]} real): rel err {error:.2e} | {timing(jax_s, torch_s)} "
        f"(JAX compile {compile_s:.0f} s)",
        flush=True,
    )
    return [error]


def reference_vae(
    folder: str, latents: np.ndarray, images: np.ndarray, repeats: int
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float, float, float]:
    """diffusers' VAE with random (perturbed) weights, saved to `folder`: (decoded, mean,
    logvar) in NHWC, its median decode and encode seconds and its millions of parameters."""
    from diffusers import AutoencoderKL as TorchVAE

    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1).copy()  # noqa: E731
    torch.manual_seed(0)
    reference = TorchVAE(**SD15_VAE).eval()
    perturb_(reference, seed=1)
    latents_t, images_t = nchw(latents), nchw(images)
    with torch.inference_mode():
        decoded = nhwc(reference.decode(latents_t).sample)
        dist = reference.encode(images_t).latent_dist
        mean, logvar = nhwc(dist.mean), nhwc(dist.logvar)
        decode_s = median_seconds(lambda: reference.decode(latents_t), repeats)
        encode_s = median_seconds(lambda: reference.encode(images_t), repeats)
    reference.save_pretrained(folder, safe_serialization=True)
    return (decoded, mean, logvar), decode_s, encode_s, count_parameters(reference) / 1e6


def check_vae(repeats: int) -> list[float]:
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((1, 8, 8, 4), dtype=np.float32)  # NHWC
    images = rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32)

    with tempfile.TemporaryDirectory(prefix="vae.") as folder:
        expected, torch_decode_s, torch_encode_s, millions = reference_vae(
            folder, latents, images, repeats
        )
        gc.collect()
        model, params = load_vae(folder)
    decoded, mean, logvar = expected

    variables = {"params": params}
    decode = jax.jit(lambda v, z: model.apply(v, z, method="decode"))
    encode = jax.jit(lambda v, x: model.apply(v, x, method="encode"))
    latents_j, images_j = jnp.asarray(latents), jnp.asarray(images)
    decoded_j = np.asarray(decode(variables, latents_j))
    mean_j, logvar_j = (np.asarray(a) for a in encode(variables, images_j))
    jax_decode_s = median_seconds(lambda: decode(variables, latents_j).block_until_ready(), repeats)
    jax_encode_s = median_seconds(
        lambda: jax.block_until_ready(encode(variables, images_j)), repeats
    )
    errors = [
        relative_error(decoded_j, decoded),
        relative_error(mean_j, mean),
        relative_error(logvar_j, logvar),
    ]
    print(
        f"vae   SD 1.5 VAE ({millions:.0f}M): decode (1, 8, 8, 4) -> (1, 64, 64, 3) rel err "
        f"{errors[0]:.2e} | {timing(jax_decode_s, torch_decode_s)}; encode (1, 64, 64, 3) "
        f"rel err mean {errors[1]:.2e}, logvar {errors[2]:.2e} | "
        f"{timing(jax_encode_s, torch_encode_s)}",
        flush=True,
    )
    return errors


LLM_LAYERS = (11, 22)


def reference_llm(
    folder: str, input_ids: np.ndarray, mask: np.ndarray, repeats: int
) -> tuple[list[np.ndarray], float, float]:
    """transformers' LlamaModel at TinyLlama's shapes with random weights (norm scales
    perturbed), saved to `folder`: its hidden states LLM_LAYERS, its median forward seconds and
    its billions of parameters; freed on return, as the T5's."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    reference = LlamaModel(LlamaConfig(**TINYLLAMA)).eval()
    perturb_(reference, seed=1, constant_only=True)
    ids, attention_mask = torch.from_numpy(input_ids), torch.from_numpy(mask)
    with torch.inference_mode():
        run = lambda: reference(  # noqa: E731
            input_ids=ids, attention_mask=attention_mask, output_hidden_states=True
        )
        hidden = run().hidden_states
        expected = [hidden[k].numpy().copy() for k in LLM_LAYERS]
        torch_s = median_seconds(run, repeats)
    reference.save_pretrained(folder, safe_serialization=True)
    return expected, torch_s, count_parameters(reference) / 1e9


def check_llm(repeats: int) -> list[float]:
    input_ids, mask = padded_tokens(TINYLLAMA["vocab_size"], pad=2)  # Llama pads with its end

    with tempfile.TemporaryDirectory(prefix="llm.") as folder:
        expected, torch_s, billions = reference_llm(folder, input_ids, mask, repeats)
        gc.collect()
        model, params = load_llm(folder)

    inputs = (jnp.asarray(input_ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    real_tokens = mask.astype(bool)
    errors, seconds = [], []
    for layer, reference in zip(LLM_LAYERS, expected, strict=True):
        apply = functools.partial(model.apply, layer=layer)
        ours, jax_s, compile_s = run_jitted(apply, params, inputs, repeats)
        errors.append(relative_error(ours[real_tokens], reference[real_tokens]))
        seconds.append(jax_s)
    print(
        f"llm   TinyLlama-1.1B shapes ({billions:.2f}B), B=2 x {TOKENS} tokens ({REAL_TOKENS[0]} "
        f"and {REAL_TOKENS[1]} real): rel err layer {LLM_LAYERS[0]} {errors[0]:.2e}, layer "
        f"{LLM_LAYERS[1]} {errors[1]:.2e} | {timing(seconds[1], torch_s)} "
        f"(JAX compile {compile_s:.0f} s; up to layer {LLM_LAYERS[0]}: {1e3 * seconds[0]:.1f} ms)",
        flush=True,
    )
    return errors


CHECKS: dict[str, Callable[[int], list[float]]] = {
    "unet": check_unet,
    "sdxl": check_sdxl_unet,
    "t5": check_t5,
    "llm": check_llm,
    "vae": check_vae,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(CHECKS), help="run this check alone")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per model")
    parser.add_argument(
        "--sdxl-resolution",
        type=int,
        choices=(256, 512, 1024),
        default=256,
        help="pixels of the SDXL check's image (latents of an eighth of it); default 256",
    )
    args = parser.parse_args()
    checks = {**CHECKS, "sdxl": functools.partial(check_sdxl_unet, resolution=args.sdxl_resolution)}

    print(
        f"float32, CPU (jax {jax.__version__}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads); tolerance {TOLERANCE:g}",
        flush=True,
    )
    worst = 0.0
    for name, check in checks.items():
        if args.only in (None, name):
            worst = max(worst, *check(args.repeats))
            gc.collect()
    if worst > TOLERANCE:
        print(f"FAIL: a relative error {worst:.2e} exceeds {TOLERANCE:g}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
