"""SDXL in the pipeline against diffusers' `StableDiffusionXLPipeline` on the tiny SDXL fixture
(tests/fixtures/reference/sdxl, see fixtures/README.md): plain SDXL (both CLIP encoders'
penultimate states, the second's projected pooled embedding, time ids, zeros for the empty
negative) and ELLA-SDXL (the connector's context at every step, the same pooled embedding and
time ids), from the same noise."""

import numpy as np
import pytest
from conftest import REFERENCE, relative_error
from PIL import Image

from ella_jax.pipeline import ELLAPipeline

SDXL = REFERENCE / "sdxl"


@pytest.fixture(scope="module")
def io():
    return np.load(SDXL / "sdxl_io.npz")


def sample(pipe: ELLAPipeline, io, mode: str) -> np.ndarray:
    latents = pipe(
        [str(p) for p in io["prompts"]],
        negative_prompt=None,
        num_inference_steps=int(io["steps"]),
        guidance_scale=float(io["guidance"]),
        height=int(io["height"]),
        width=int(io["width"]),
        latents=io["latents0"].transpose(0, 2, 3, 1),
        output_type="latent",
        mode=mode,
    )
    return np.asarray(latents).transpose(0, 3, 1, 2)


def test_plain_sdxl_matches_diffusers(io):
    pipe = ELLAPipeline.from_pretrained(SDXL / "sdxl")
    assert pipe.scheduler.kind == "euler"
    assert relative_error(sample(pipe, io, "clip"), io["latents_clip"]) < 1e-4


def test_ella_sdxl_matches_diffusers_with_ella(io):
    pipe = ELLAPipeline.from_pretrained(
        SDXL / "sdxl", REFERENCE / "t5", SDXL / "ella_sdxl.safetensors", ella_heads=4
    )
    prompts = [str(p) for p in io["prompts"]]
    features, _ = pipe.encode_prompt(prompts, "fixed")
    assert relative_error(features, io["t5_fixed"]) < 1e-4
    _, pooled = pipe.encode_sdxl(prompts)
    assert relative_error(pooled, io["pooled"]) < 1e-5
    assert relative_error(sample(pipe, io, "ella"), io["latents_ella"]) < 1e-4


def test_generate_renders_ella_sdxl_and_dpg_bench_grids(tmp_path):
    """`python -m ella_jax.generate` on the SDXL folder: ELLA-SDXL images and DPG-Bench grids."""
    from ella_jax.generate import main

    tsv = tmp_path / "prompts.tsv"
    tsv.write_text("a1\ta red book\n")
    models = ["--sd", str(SDXL / "sdxl"), "--t5", str(REFERENCE / "t5"), "--ella",
              str(SDXL / "ella_sdxl.safetensors"), "--ella-heads", "4", "--size", "16",
              "--steps", "2"]  # fmt: skip
    assert main([*models, "--prompt", "a red book", "--out", str(tmp_path / "images")]) == 0
    assert (tmp_path / "images" / "0_a-red-book.png").is_file()
    assert main([*models, "--dpg-bench", str(tsv), "--out", str(tmp_path / "grids")]) == 0
    assert Image.open(tmp_path / "grids" / "a1.png").size == (32, 32)
