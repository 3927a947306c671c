"""The toy world's shipped models (models/toy, made by `toyworld.pretrain`): standard folders that
diffusers and transformers load and that compute what the JAX ports compute; a VAE that loses
nothing the scorer reads; a frozen toy UNet that ELLA learns to drive; the evaluation."""

import json
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, param_update, project_config, relative_error, train_step_setup
from PIL import Image

from ella_jax.models.ella import ELLA
from ella_jax.text import load_tokenizer, tokenize
from ella_jax.train.trainer import RUN_CONFIG_FILE
from ella_jax.weights.clip import load_clip_text_encoder
from ella_jax.weights.diffusers import load_unet, load_vae
from ella_jax.weights.ella import CONFIG_KEYS, write_official, write_official_config
from ella_jax.weights.t5 import load_t5_encoder
from toyworld.scenes import generate, png_bytes
from toyworld.score import score_many

MODELS = ROOT / "models" / "toy"
SD = MODELS / "sd"
STEPS, FALL = 10, 0.7  # measured 0.715 -> 0.429 in 10 steps (0.373 in 40)
CAPTION = "a red square to the left of a blue circle on a black background"


def test_tokenizers_have_one_token_per_word():
    words = CAPTION.split()
    clip = load_tokenizer(SD / "tokenizer")
    assert len(clip(CAPTION)["input_ids"]) == len(words) + 2  # start and end
    t5 = load_tokenizer(MODELS / "t5")
    assert len(t5(CAPTION)["input_ids"]) == len(words) + 1  # end


def test_toy_folders_compute_what_pytorch_computes():
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, T5EncoderModel

    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, 8, 8, 8), np.float32)
    context = rng.standard_normal((2, 32, 128), np.float32)
    nchw = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    with torch.no_grad():
        unet = UNet2DConditionModel.from_pretrained(SD / "unet", torch_dtype=torch.float32)
        expected = unet(nchw(latents), 500, torch.from_numpy(context)).sample
        model, params = load_unet(SD / "unet")
        out = model.apply({"params": params}, latents, 500, context)
        assert relative_error(out, expected.numpy().transpose(0, 2, 3, 1)) < 1e-4

        vae = AutoencoderKL.from_pretrained(SD / "vae", torch_dtype=torch.float32)
        expected = vae.decode(nchw(latents)).sample
        model, params = load_vae(SD / "vae")
        out = model.apply({"params": params}, latents, method="decode")
        assert relative_error(out, expected.numpy().transpose(0, 2, 3, 1)) < 1e-4

        ids, mask = tokenize(load_tokenizer(SD / "tokenizer"), [CAPTION, ""], 32)
        clip = CLIPTextModel.from_pretrained(SD / "text_encoder", torch_dtype=torch.float32)
        expected = clip(torch.from_numpy(ids).long()).last_hidden_state
        model, params = load_clip_text_encoder(SD / "text_encoder")
        assert relative_error(model.apply({"params": params}, ids)[0], expected.numpy()) < 1e-4

        ids, mask = tokenize(load_tokenizer(MODELS / "t5"), [CAPTION, ""], 128)
        t5 = T5EncoderModel.from_pretrained(MODELS / "t5", torch_dtype=torch.float32)
        expected = t5(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
        model, params = load_t5_encoder(MODELS / "t5")
        out = model.apply({"params": params}, ids, mask)
        assert relative_error(out, expected.last_hidden_state.numpy()) < 1e-4


def test_toy_vae_reconstructions_score_perfectly():
    """What the scorer reads back from a VAE round trip of held-out scenes is what it reads from
    the scenes (all 256 of seed 1 measured), so the VAE does not limit the accuracies."""
    vae, params = load_vae(SD / "vae")
    scenes = generate(1, 32)
    pixels = np.stack([image for image, _ in scenes]) / 127.5 - 1.0
    mean, _ = vae.apply({"params": params}, pixels, method="encode")
    decoded = vae.apply({"params": params}, mean, method="decode")
    images = np.asarray(jnp.round(jnp.clip((decoded + 1.0) * 127.5, 0, 255))).astype(np.uint8)
    accuracy = score_many(list(images), [text for _, text in scenes])
    assert all(value == 1.0 for value in accuracy.values()), accuracy


SCENES = [{"image": png_bytes(image), "caption": text} for image, text in generate(5, 8)]


@pytest.fixture(scope="module")
def toy_setup():
    return train_step_setup(project_config("toy"), SCENES, resolution=32)


def test_ella_learns_to_drive_the_frozen_toy_unet(toy_setup):
    """Same batch, noise and timesteps every step (the RNG is reset), so only ELLA can lower the
    loss; the pretrained toy UNet listens to its context, so it falls far (the random fixture
    UNet of test_train moves by 6e-4)."""
    make_step, frozen, batch = toy_setup
    step, state = make_step(optax.adam(1e-3))
    step = jax.jit(step)
    losses = []
    for _ in range(STEPS):
        rng = state.rng
        state, metrics = step(state, frozen, batch)
        state = state.replace(rng=rng)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < FALL * losses[0], losses


def sgd_update(setup) -> Callable[[dict | None], tuple[float, np.ndarray]]:
    """update(batch=None) -> (loss, the flattened update of ELLA's params) of one SGD step at
    learning rate 1 from the initial state, on `batch` (default: the setup's)."""
    make_step, frozen, first_batch = setup
    step, state = make_step(optax.sgd(1.0))
    step = jax.jit(step)

    def update(batch: dict | None = None) -> tuple[float, np.ndarray]:
        new_state, metrics = step(state, frozen, first_batch if batch is None else batch)
        moved = param_update(new_state, state)
        return float(metrics["loss"]), np.concatenate([a.ravel() for a in moved])

    return update


def test_the_papers_dtypes_give_the_float32_step(toy_setup):
    """configs/ella_sd15_t5xl.py's dtypes (bfloat16 compute of ELLA, UNet and VAE; float16 T5;
    float32 master params) against the float32 step on the same batch, noise and timesteps.
    bfloat16 keeps 8 significant bits (2e-3 a rounding): the loss averages its roundings away;
    the update carries those of ELLA and the UNet forward and back, as test_step_parity's
    bfloat16 gradients do against PyTorch (0.03 to 0.05 of their largest entry). The toy UNet
    listens to its context, so ELLA's gradient stands above those roundings (the fixture UNet
    of test_train barely listens: there bfloat16 moves the update by half). The update's
    tolerance (its relative L2 error) is a few times the roundings measured, a seventh of what
    the same step with the captions shifted by one example moves it."""
    _, _, batch = toy_setup
    low_setup = train_step_setup(
        project_config("toy", dtype="bfloat16", t5_dtype="float16"), SCENES, resolution=32
    )
    assert {str(a.dtype) for a in jax.tree.leaves(low_setup[1]["text"])} == {"float16"}
    assert {str(a.dtype) for a in jax.tree.leaves(low_setup[1]["unet"])} == {"bfloat16"}
    expected_loss, expected = sgd_update(toy_setup)()
    low_update = sgd_update(low_setup)
    loss, update = low_update()
    shifted = {key: np.roll(batch[key], 1, axis=0) for key in ("input_ids", "token_mask")}
    _, wrong = low_update({**batch, **shifted})
    l2 = lambda a, b: float(np.linalg.norm(a - b) / np.linalg.norm(b))  # noqa: E731
    assert relative_error(loss, expected_loss) < 1e-3  # measured 5.6e-4
    assert l2(update, expected) < 0.05  # measured 0.019
    assert l2(wrong, expected) > 0.3  # measured 0.36


def test_evaluation_writes_scores_and_samples(tmp_path, capsys):
    """`python -m toyworld.evaluate` (its command line, in this process) on a connector as
    train.main exports it (here at its initialisation; configs/toy.py's training is the main
    job, the trainer is tested with configs/tiny.py), with its toy DPG-Bench; then the chain a
    user runs, `python -m ella_jax.generate --dpg-bench` and `python -m ella_jax.dpg_bench
    score`, on the toy SD gives the evaluation's grids and score."""
    from ella_jax.dpg_bench.__main__ import main as score
    from ella_jax.generate import main as generate
    from toyworld.evaluate import main

    config = project_config("toy")
    ella = ELLA(**config.ella, input_dim=128)
    params = ella.init(jax.random.key(0), jnp.zeros((1, 1, 128)), jnp.zeros((1,)))["params"]
    write_official(tmp_path / "ella.safetensors", params)
    write_official_config(tmp_path / "ella_config.json", {k: getattr(ella, k) for k in CONFIG_KEYS})
    (tmp_path / RUN_CONFIG_FILE).write_text(config.to_json())  # mask_padding: flexible tokens
    argv = ["--models", str(MODELS), "--workdir", str(tmp_path), "--count", "4", "--steps", "2",
            "--grid", "4", "--dpg-count", "1"]  # fmt: skip
    assert main(argv) == 0
    assert "nan" not in capsys.readouterr().out  # an attribute no caption states: "-"
    written = json.loads((tmp_path / "eval" / "scores.json").read_text())
    # configs/toy.py's hold_out splits the captions: all, trained and held-out combinations.
    splits = written["splits"]
    assert list(splits) == ["all", "trained combinations", "held-out combinations"]
    assert splits["all"] == 4 == splits["trained combinations"] + splits["held-out combinations"]
    ways = ["toy SD", "untrained ELLA", "trained ELLA"]
    rows = [f"{way}: {split} ({n})" for way in ways for split, n in splits.items()]
    assert list(written["scores"]) == rows
    assert list(written["dpg_bench"]) == [f"{way}: all (4)" for way in ways]
    assert main(argv) == 2  # eval/ exists: kept, one line
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'eval'}: already exists (pass --overwrite to replace it)\n"
    assert written["count"] == 4
    assert written["token_length"] == "flexible"
    assert sum(written["captions_stating"].values()) > 4
    assert (tmp_path / "eval" / "samples.png").is_file()
    assert len((tmp_path / "eval" / "scores.md").read_text().splitlines()) == 17
    assert set(written["dpg_bench"]["toy SD: all (4)"]["l1"]) <= {"entity", "attribute", "relation",
                                                         "other", "global"}  # fmt: skip

    dpg = tmp_path / "eval" / "dpg_bench"
    csv, grids = dpg / "toy_dpg_bench.csv", tmp_path / "grids"
    argv = ["--sd", str(SD), "--mode", "clip", "--dpg-bench", str(csv), "--size", "32",
            "--steps", "2", "--guidance", "3.0", "--out", str(grids)]  # fmt: skip
    assert generate(argv) == 0
    expected = np.asarray(Image.open(dpg / "toy-sd" / "grids" / "toy-0000.png"))
    np.testing.assert_array_equal(np.asarray(Image.open(grids / "toy-0000.png")), expected)
    argv = ["score", "--csv", str(csv), "--images", str(grids), "--resolution", "32",
            "--vqa", "toyworld.dpg_bench:answer", "--out", str(tmp_path / "score")]  # fmt: skip
    assert score(argv) == 0
    scored = json.loads((tmp_path / "score" / "scores.json").read_text())
    assert scored["score"] == written["dpg_bench"]["toy SD: all (4)"]["score"]


def test_sur_evaluation_scores_paraphrases_against_their_templates(tmp_path, monkeypatch):
    """`python -m toyworld.evaluate_sur` on an adapter as train.main exports it (at its
    initialisation; the official batch-axis attention, so drawn one prompt at a time) beside
    the toy SD's ceiling and floor rows."""
    from ella_jax.models.sur_adapter import SURAdapter
    from ella_jax.weights import sur
    from toyworld.evaluate_sur import main

    config = project_config("sur_toy")
    config.sur.attend = "batch"
    adapter = SURAdapter(width=128, attend="batch")
    params = adapter.init(jax.random.key(0), jnp.zeros((1, 1, 128)))["params"]
    sur_config = {"depth": 2, "adapter_weight": 0.1, "sd_text_size": 128}
    sur.write_official(tmp_path / "sur" / "sur_adapter.safetensors", params, sur_config)
    (tmp_path / "sur" / RUN_CONFIG_FILE).write_text(config.to_json())
    argv = ["--models", str(MODELS), "--out", str(tmp_path / "eval"), "--count", "3",
            "--steps", "2", "--grid", "3", "--sur", f"released={tmp_path / 'sur'}"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["toyworld.evaluate_sur", *argv])
    main()
    written = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert list(written["scores"]) == [
        "toy SD, template captions (ceiling)",
        "toy SD, paraphrases (floor)",
        "released",
    ]
    assert len(written["shown_paraphrases"]) == 3
    assert (tmp_path / "eval" / "samples.png").is_file()
