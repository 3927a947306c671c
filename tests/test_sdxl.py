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


def test_tiny_ella_sdxl_run_trains_resumes_and_exports(tmp_path):
    """configs/tiny.py on the SDXL fixture: the UNet's added conditions come from the frozen
    second CLIP encoder and each image's sizes; the run resumes from its checkpoint and exports
    an official-layout ELLA at the UNet's width; its samples render."""
    from conftest import read_metrics, tiny_config

    from ella_jax import load_ella
    from train.trainer import train

    config = tiny_config(sd=str(SDXL / "sdxl"), total_steps=2, checkpoint_every=2,
                         log_every=1, sample_every=3, sample_steps=2)  # fmt: skip
    config.ella.update(width=96, heads=4)
    train(config, tmp_path / "w")
    config.total_steps = 3
    train(config, tmp_path / "w")  # resumes at step 2
    metrics = read_metrics(tmp_path / "w")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    model, _ = load_ella(tmp_path / "w" / "ella.safetensors")
    assert (model.width, model.input_dim) == (96, 96)
    assert list((tmp_path / "w" / "samples").glob("*.png"))


def test_precomputed_data_for_sdxl_is_refused_by_name(tmp_path):
    from conftest import tiny_config

    from train.trainer import ConfigError, check_config

    (tmp_path / "precompute.json").write_text("{}")
    config = tiny_config(sd=str(SDXL / "sdxl"))
    config.ella.update(width=96, heads=4)
    config.data.update(source="precomputed", path=str(tmp_path))
    with pytest.raises(ConfigError, match=r"is SDXL: train\.precompute does not yet write"):
        check_config(config)
