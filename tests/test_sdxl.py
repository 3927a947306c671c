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


def sdxl_config(**overrides):
    from conftest import tiny_config

    settings = dict(sd=str(SDXL / "sdxl"), total_steps=2, checkpoint_every=2, log_every=1,
                    sample_every=3, sample_steps=2)  # fmt: skip
    config = tiny_config(**{**settings, **overrides})
    config.ella.update(width=96, heads=4)
    return config


@pytest.fixture(scope="module")
def sdxl_run(tmp_path_factory):
    """configs/tiny.py on the SDXL fixture folder: 2 steps, then resumed to 3."""
    from ella_jax.train.trainer import train

    workdir = tmp_path_factory.mktemp("sdxl") / "w"
    config = sdxl_config()
    train(config, workdir)
    config.total_steps = 3
    train(config, workdir)  # resumes at step 2
    return workdir


def test_tiny_ella_sdxl_run_trains_resumes_and_exports(sdxl_run):
    """The UNet's added conditions come from the frozen second CLIP encoder and each image's
    sizes; the run resumes from its checkpoint and exports an official-layout ELLA at the
    UNet's width; its samples render."""
    from conftest import read_metrics

    from ella_jax import load_ella

    metrics = read_metrics(sdxl_run)
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in metrics if "loss" in m)
    model, _ = load_ella(sdxl_run / "ella.safetensors")
    assert (model.width, model.input_dim) == (96, 96)
    assert list((sdxl_run / "samples").glob("*.png"))


def test_precomputed_sdxl_data_gives_the_online_losses(sdxl_run, tmp_path):
    """train.precompute on the SDXL folder also writes each caption's pooled embedding and each
    image's time ids: training from them logs the online run's first losses."""
    from conftest import read_metrics, relative_error

    from ella_jax.train.precompute import precompute
    from ella_jax.train.trainer import ConfigError, check_config, train

    summary = precompute(sdxl_config(), tmp_path / "features")
    assert summary["sdxl"] is True
    config = sdxl_config(sample_every=1000)
    config.data.update(source="precomputed", path=str(tmp_path / "features"))
    train(config, tmp_path / "run")
    online = [m for m in read_metrics(sdxl_run) if "loss" in m][:2]
    for a, b in zip(read_metrics(tmp_path / "run"), online, strict=True):
        assert relative_error(a["loss"], b["loss"]) < 1e-5, a["step"]
    # Features made for SD 1.5 lack the added conditions: refused by name.
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "precompute.json").write_text("{}")
    config.data.path = str(tmp_path / "plain")
    with pytest.raises(ConfigError, match=r"is SDXL, but .* was made for another model"):
        check_config(config)


def test_sdxl_added_conditions_of_the_data(io, tmp_path):
    """What the training data gives SDXL's added conditions: the time ids of a 24 x 40 image at
    16 px (resized to 16 x 27, its centre crop 5 from the left) and the pooled embeddings
    train.precompute computes, as diffusers' pipeline does for the fixture's prompts."""
    from ella_jax.train import data
    from ella_jax.train.precompute import sdxl_pooling

    image = tmp_path / "wide.png"
    Image.new("RGB", (40, 24), (200, 10, 10)).save(image)
    decoded = data.decode({"image": str(image), "caption": "c"}, 16, time_ids=True)
    np.testing.assert_array_equal(decoded["time_ids"], [24, 40, 0, 5, 16, 16])
    pooled = sdxl_pooling(sdxl_config())([str(p) for p in io["prompts"]])
    assert relative_error(pooled, io["pooled"]) < 1e-5
