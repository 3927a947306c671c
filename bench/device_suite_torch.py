"""The device suite's PyTorch + diffusers rows: the same work as `bench.device_suite`'s JAX rows,
on the same device (CUDA when there is one), in one process of their own (`torch_rows`).

diffusers' `UNet2DConditionModel` (SDPA attention, its default) with frozen bfloat16 weights,
`bench.torch_ella.TorchELLA` (float32 master weights), bfloat16 autocast; training with AdamW
(fused on CUDA), global-norm clipping, EMA and diffusers' `DDPMScheduler` noising, gradient
checkpointing for remat "blocks"; sampling with `DPMSolverMultistepScheduler`; SDXL's added
conditions (a random pooled embedding, the suite's time ids) where the UNet takes them. Needs torch
and diffusers.
"""

import time
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel

from bench.model_configs import pooled_width
from bench.timing import median_seconds
from bench.torch_ella import TorchELLA


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _device_info(device: torch.device) -> dict:
    kind = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return {"kind": kind, "torch": torch.__version__}


def _models(shapes: dict, device: torch.device) -> tuple[UNet2DConditionModel, TorchELLA]:
    """Random weights (PyTorch's initialisations): the frozen UNet in bfloat16, ELLA float32."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**shapes["unet"]).to(device, torch.bfloat16).eval()
    unet.requires_grad_(False)
    ella = TorchELLA(**shapes["ella"]).to(device)
    return unet, ella


def _added_conditions(shapes: dict, batch: int, device: torch.device) -> dict:
    """diffusers' `added_cond_kwargs` for `batch` images (SDXL), {} for a UNet without them."""
    width = pooled_width(shapes["unet"])
    if width is None:
        return {}
    size = shapes["resolution"]
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)
    text_embeds = torch.randn(batch, width, device=device, dtype=torch.bfloat16)
    time_ids = time_ids.repeat(batch, 1)
    return {"added_cond_kwargs": {"text_embeds": text_embeds, "time_ids": time_ids}}


def _median_seconds(run: Callable[[], Any], device: torch.device, repeats: int) -> float:
    return median_seconds(lambda: (run(), _sync(device)), repeats)


def torch_train_step(shapes: dict, remat: str, batch: int, steps: int) -> dict:
    device = _device()
    unet, ella = _models(shapes, device)
    if remat == "blocks":
        unet.enable_gradient_checkpointing()
    ella.train()
    params = list(ella.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=device.type == "cuda")
    scheduler = DDPMScheduler.from_config(shapes["scheduler"])
    latent, tokens = shapes["resolution"] // 8, shapes["tokens"]
    generator = torch.Generator(device).manual_seed(0)
    moments = torch.randn(2, batch, 4, latent, latent, device=device, generator=generator)
    mean, logvar = moments.to(torch.bfloat16)
    features = torch.randn(batch, tokens, shapes["ella"]["input_dim"], device=device)
    features = features.to(torch.float16)
    token_mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    added = _added_conditions(shapes, batch, device)

    def step() -> torch.Tensor:
        latents = mean.float() + torch.exp(0.5 * logvar.float()) * torch.randn_like(mean.float())
        latents = latents * shapes["scaling_factor"]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (batch,), device=device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            context = ella(features.float(), timesteps.float(), token_mask)
            prediction = unet(noisy, timesteps, context, **added).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1 - 0.9999)
        return loss

    for _ in range(2):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    return {
        "batch": batch,
        "remat": remat,
        "samples_per_s": batch / seconds,
        "step_seconds": seconds,
        "peak_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "loss": float(loss),
    }


def torch_sampler(shapes: dict, batch: int) -> dict:
    device = _device()
    unet, ella = _models(shapes, device)
    ella = ella.to(torch.bfloat16).eval()
    scheduler = DPMSolverMultistepScheduler.from_config(shapes["scheduler"])
    latent, tokens = shapes["resolution"] // 8, shapes["tokens"]
    generator = torch.Generator(device).manual_seed(0)
    width = shapes["ella"]["input_dim"]
    features = torch.randn(2 * batch, tokens, width, device=device, generator=generator)
    features = features.to(torch.bfloat16)
    token_mask = torch.ones(2 * batch, tokens, dtype=torch.bool, device=device)
    start_latents = torch.randn(batch, 4, latent, latent, device=device, generator=generator)
    added = _added_conditions(shapes, 2 * batch, device)

    @torch.inference_mode()
    def sample() -> torch.Tensor:
        scheduler.set_timesteps(shapes["sample_steps"], device=device)
        x = start_latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([x, x]), t).to(torch.bfloat16)
            context = ella(features, t.float(), token_mask)
            prediction = unet(x_in, t, context, **added).sample.float()
            unconditional, conditional = prediction.chunk(2)
            guided = unconditional + 7.5 * (conditional - unconditional)
            x = scheduler.step(guided, t, x).prev_sample
        return x

    seconds = _median_seconds(sample, device, repeats=2)
    return {
        "batch": batch,
        "steps": shapes["sample_steps"],
        "seconds_per_image": seconds / batch,
    }


def torch_connector(shapes: dict, batch: int) -> dict:
    device = _device()
    torch.manual_seed(0)
    ella = TorchELLA(**shapes["ella"]).to(device, torch.bfloat16).eval()
    width = shapes["ella"]["input_dim"]
    features = torch.randn(batch, shapes["tokens"], width, device=device).to(torch.bfloat16)
    timesteps = torch.tensor([999.0, 250.0][:batch], device=device)

    @torch.inference_mode()
    def forward() -> torch.Tensor:
        return ella(features, timesteps)

    seconds = _median_seconds(forward, device, repeats=50)
    return {
        "batch": batch,
        "tokens": shapes["tokens"],
        "seconds": seconds,
    }


def torch_rows(
    shapes: dict, train_batches: dict[str, int | None], steps: int, jax_platform: str
) -> dict:
    """Every row of the suite, each its own result or {"error": ...}, and "device": the train
    rows at the batches JAX chose (`train_batches`, by row name; None: no JAX batch, no row).
    Where JAX ran on a GPU and this torch has no CUDA, every row is skipped."""
    device = _device()
    names = ("train_step", "train_step_remat", "sampler", "sampler_batched", "connector")
    if jax_platform == "gpu" and device.type != "cuda":
        skipped = {"skipped": f"torch {torch.__version__} has no CUDA; JAX ran on the GPU"}
        return {**dict.fromkeys(names, skipped), "device": _device_info(device)}
    runs = {
        "train_step": lambda: torch_train_step(shapes, "none", train_batches["train_step"], steps),
        "train_step_remat": lambda: torch_train_step(
            shapes, "blocks", train_batches["train_step_remat"], steps
        ),
        **{
            name: (lambda batch=batch: torch_sampler(shapes, batch))
            for name, batch in zip(
                ("sampler", "sampler_batched"), shapes["sample_batches"], strict=True
            )
        },
        "connector": lambda: torch_connector(shapes, 2),
    }
    rows: dict = {"device": _device_info(device)}
    for name, run in runs.items():
        if name in train_batches and train_batches[name] is None:
            rows[name] = {"skipped": "the JAX row did not run"}
            continue
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            rows[name] = run()
        except torch.OutOfMemoryError as e:
            rows[name] = {"error": f"out of memory: {str(e).splitlines()[0]}"}
    return rows
