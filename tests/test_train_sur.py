"""SUR-adapter training through the shared trainer: what reaches the adapter under each option,
the export against the official class (tests/torch_sur.py), W0 kept across a resume, errors."""

import json

import numpy as np
import pytest
import safetensors.numpy
from conftest import REFERENCE, ROOT, project_config, read_metrics, read_tensors, tiny_llm_folder

from ella_jax import load_sur_adapter
from ella_jax.convert.__main__ import main as convert_main
from ella_jax.train.trainer import ConfigError, check_config, train

LLM_WIDTH = 24


@pytest.fixture(scope="module")
def sur_data(tmp_path_factory):
    """data/tiny's images with a simple and a complex caption each, and an LLM vector per
    simple caption: (manifest, vectors)."""
    folder = tmp_path_factory.mktemp("sur-data")
    lines = (ROOT / "data" / "tiny" / "captions.jsonl").read_text().splitlines()
    rng = np.random.default_rng(0)
    records, vectors = [], {"": rng.standard_normal(LLM_WIDTH).astype(np.float32)}
    for line in lines:
        entry = json.loads(line)
        simple = " ".join(entry["caption"].split()[:3])
        image = str(ROOT / "data" / "tiny" / entry["image"])
        records.append({"image": image, "caption": simple, "complex": entry["caption"]})
        vectors[simple] = rng.standard_normal(LLM_WIDTH).astype(np.float32)
    (folder / "sur.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    safetensors.numpy.save_file(vectors, folder / "vectors.safetensors")
    return folder / "sur.jsonl", folder / "vectors.safetensors"


def sur_config(sur_data, **sur_options):
    manifest, vectors = sur_data
    config = project_config("sur_sd15")
    config.update(
        dict(
            sd=str(REFERENCE / "sd"),
            batch_size=8,
            gradient_accumulation=1,
            total_steps=4,
            checkpoint_every=2,
            log_every=2,
            sample_every=1000,  # no samples (compiling the sampler): one test asks for them
            sample_steps=2,
            learning_rate=1e-2,
            dtype="float32",
            sample_prompts=["a red square", ""],
        )
    )
    config.data.update(dict(source="manifest", path=str(manifest), resolution=16))
    config.sur.update({"llm_vectors": str(vectors), **sur_options})
    return config


def trained(workdir):
    return read_tensors(workdir / "sur_adapter.safetensors")


def test_official_options_train_only_through_the_distillation(sur_data, tmp_path):
    """As released (UNet input detached), the MSE sends the adapter nothing: with the
    distillation weights at 0 and no weight decay, it ends where it started; the fixed
    gradient moves it. The unused official tensors never move, even under weight decay."""
    still = sur_config(
        sur_data, attend="batch", detach_unet_input=True, lambda_llm=0.0, lambda_cp=0.0
    )
    still.weight_decay = 0.0
    train(still, tmp_path / "detached")
    moved = sur_config(
        sur_data, attend="batch", detach_unet_input=False, lambda_llm=0.0, lambda_cp=0.0
    )
    train(moved, tmp_path / "fixed")

    detached, fixed = trained(tmp_path / "detached"), trained(tmp_path / "fixed")
    # fc starts at zero (the official initialisation): only a gradient moves it.
    assert not np.any(detached["fc.weight"])
    assert np.any(fixed["fc.weight"])
    for name in detached:
        if name.startswith("encoder_layer.") or name.startswith("attention.value_layer."):
            assert np.array_equal(fixed[name], detached[name]), name


def test_export_loads_strictly_in_the_official_class(sur_data, tmp_path):
    import torch
    from torch_sur import Adapter

    config = sur_config(sur_data, attend="batch", loss="kl", lambda_llm=1.0, lambda_cp=1.0)
    config.sample_every = 4
    train(config, tmp_path / "w")
    sur_config_json = json.loads((tmp_path / "w" / "sur_config.json").read_text())
    assert sur_config_json == {"depth": 2, "adapter_weight": 0.1, "sd_text_size": 64}
    adapter = Adapter(**sur_config_json).eval()
    state = {k: torch.from_numpy(v) for k, v in trained(tmp_path / "w").items()}
    adapter.load_state_dict(state, strict=True)
    x = np.random.default_rng(1).standard_normal((2, 77, 64)).astype(np.float32)
    with torch.no_grad():
        expected = adapter(torch.from_numpy(x))[0].numpy()
    model, params = load_sur_adapter(tmp_path / "w" / "sur_adapter.safetensors", mode="official")
    np.testing.assert_allclose(model.apply({"params": params}, x)[0], expected, atol=1e-5)
    # convert export reads the run's checkpoint as the run's own export does.
    out = tmp_path / "exported" / "adapter.safetensors"
    assert convert_main(["export", str(tmp_path / "w"), str(out)]) == 0
    exported = safetensors.numpy.load_file(out)
    assert all(np.array_equal(exported[k], v) for k, v in trained(tmp_path / "w").items())
    assert json.loads((out.parent / "sur_config.json").read_text()) == sur_config_json
    assert load_sur_adapter(out)[0].attend == "batch"  # as the run trained, from its config
    metrics = read_metrics(tmp_path / "w")
    assert {"loss_llm", "loss_cp"} <= set(metrics[-1])
    assert list((tmp_path / "w" / "samples").glob("*.png"))


def test_course_variant_learns_eta_and_keeps_w0_on_resume(sur_data, tmp_path):
    config = sur_config(sur_data, loss="cosine", eta="learned", lambda_llm=1.0, lambda_cp=1.0)
    config.total_steps = 2
    train(config, tmp_path / "w")
    projection = read_tensors(tmp_path / "w" / "sur_llm_projection.safetensors")
    assert projection["weight"].shape == (64, LLM_WIDTH)
    config.total_steps = 4
    config.seed = 5  # a resumed run keeps the W0 it started with, whatever the seed says now
    train(config, tmp_path / "w")
    again = read_tensors(tmp_path / "w" / "sur_llm_projection.safetensors")
    assert all(np.array_equal(projection[k], again[k]) for k in projection)
    assert (tmp_path / "w" / "eta_head.safetensors").is_file()
    model, params = load_sur_adapter(tmp_path / "w" / "sur_adapter.safetensors", mode="fixed")
    assert model.learned_eta
    # The attention the run used is stored with the export and followed by default.
    assert load_sur_adapter(tmp_path / "w" / "sur_adapter.safetensors")[0].attend == "tokens"
    # The learned mix has left 0.1: the same adapter with eta fixed at 0.1 differs.
    x = np.random.default_rng(2).standard_normal((2, 77, 64)).astype(np.float32)
    fixed = model.clone(learned_eta=False)
    without_head = {k: v for k, v in params.items() if k != "eta_head"}
    learned_out = model.apply({"params": params}, x)[0]
    assert np.abs(learned_out - fixed.apply({"params": without_head}, x)[0]).max() > 1e-4


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.sur.update(attend="heads"), r"config\.sur\.attend='heads'"),
        (lambda c: c.sur.update(loss="mse"), r"config\.sur\.loss='mse'"),
        (lambda c: c.sur.update(eta="1.5"), r"config\.sur\.eta='1\.5'"),
        (
            lambda c: c.sur.update(llm_vectors="/nowhere.safetensors"),
            r"/nowhere\.safetensors is not a file",
        ),
        (lambda c: c.data.update(source="webdataset"), r"reads complex captions from"),
        (lambda c: c.update(method="lora"), r"config\.method='lora'"),
        (lambda c: c.update(gradient_accumulation=0), r"gradient_accumulation=0"),
        (lambda c: c.sur.update(eta="learned", initial_eta=1.0), r"initial_eta=1\.0"),
        (lambda c: c.sur.update(temperature=0.0), r"temperature=0\.0 must be positive"),
    ],
)
def test_bad_config_names_the_key(sur_data, change, message):
    config = sur_config(sur_data)
    change(config)
    with pytest.raises(ConfigError, match=message):
        check_config(config)


def test_gradient_accumulation_updates_every_k_steps(sur_data, tmp_path):
    """With 4 steps accumulated, 3 steps change nothing (fc stays at its zero start); the 4th
    updates."""
    config = sur_config(sur_data, detach_unet_input=False, lambda_llm=0.0, lambda_cp=0.0)
    config.update(gradient_accumulation=4, total_steps=3, checkpoint_every=3)
    train(config, tmp_path / "w")
    assert not np.any(trained(tmp_path / "w")["fc.weight"])  # 3 of 4 steps: no update yet
    config.update(total_steps=4, checkpoint_every=4)
    train(config, tmp_path / "w")
    assert np.any(trained(tmp_path / "w")["fc.weight"])


def test_a_caption_without_an_llm_vector_is_named(sur_data, tmp_path):
    vectors = sur_data[1]
    some = dict(safetensors.numpy.load_file(vectors))
    missing = sorted(some)[1]
    del some[missing]
    safetensors.numpy.save_file(some, tmp_path / "vectors.safetensors")
    config = sur_config(sur_data, llm_vectors=str(tmp_path / "vectors.safetensors"))
    with pytest.raises(ValueError, match=f"caption {missing!r} has no vector in .*vectors"):
        train(config, tmp_path / "w")


def test_toy_config_precomputes_vectors_and_exports_an_official_adapter(tmp_path):
    """configs/sur_toy.py as the README runs it, on 64 paraphrased scenes: train.precompute
    writes the LLM vectors of the paraphrases, 12 steps export an adapter that the official
    class loads strictly."""
    import torch
    from torch_sur import Adapter

    from ella_jax.train.precompute import precompute
    from toyworld import scenes

    manifest = scenes.write_folder(tmp_path / "scenes", seed=7, count=64, paraphrased=True)
    config = project_config("sur_toy")
    config.data.update(dict(source="manifest", path=str(manifest)))
    precompute(config, tmp_path / "features")
    vectors = safetensors.numpy.load_file(tmp_path / "features" / "llm_vectors.safetensors")
    captions = {json.loads(line)["caption"] for line in manifest.read_text().splitlines()}
    assert set(vectors) == captions | {""} and vectors[""].shape == (128,)

    config.data.update(dict(source="precomputed", path=str(tmp_path / "features")))
    config.update(dict(total_steps=12, checkpoint_every=12, sample_every=1000, batch_size=16))
    train(config, tmp_path / "w")
    sur_config_json = json.loads((tmp_path / "w" / "sur_config.json").read_text())
    adapter = Adapter(**sur_config_json)
    state = {k: torch.from_numpy(v) for k, v in trained(tmp_path / "w").items()}
    adapter.load_state_dict(state, strict=True)


def test_a_record_without_a_complex_caption_is_named(sur_data, tmp_path):
    manifest = sur_data[0]
    lines = manifest.read_text().splitlines()
    plain = [json.dumps({k: v for k, v in json.loads(line).items() if k != "complex"})
             for line in lines]  # fmt: skip
    (tmp_path / "plain.jsonl").write_text("\n".join(plain) + "\n")
    config = sur_config(sur_data)
    config.data.path = str(tmp_path / "plain.jsonl")
    with pytest.raises(ValueError, match="has no 'complex' caption"):
        train(config, tmp_path / "w")


def test_precompute_pools_an_llm_layer_into_the_vectors(sur_data, tmp_path):
    """A SUR config on a decoder-only LLM: llm_vectors.safetensors holds, per caption, the LLM's
    hidden state at config.text_encoder.layer on the caption's last real token
    (sur.llm_pooling="last"), as transformers' LlamaModel computes it."""
    import torch
    from transformers import LlamaModel

    from ella_jax.text import load_tokenizer
    from ella_jax.train.precompute import precompute

    llm = tiny_llm_folder(tmp_path / "llm")
    config = sur_config(sur_data, llm_pooling="last")
    config.text_encoder.update(path=str(llm), layer=2, dtype="float32")  # the recipe: float16
    summary = precompute(config, tmp_path / "features")
    assert (summary["text_kind"], summary["text_layer"], summary["llm_pooling"]) == (
        "llm",
        2,
        "last",
    )
    vectors = read_tensors(tmp_path / "features" / "llm_vectors.safetensors")
    tokenizer = load_tokenizer(llm)
    reference = LlamaModel.from_pretrained(llm).eval()
    for caption in ["", *sorted(vectors)[1:4]]:
        ids = torch.tensor([tokenizer(caption)["input_ids"]])
        with torch.no_grad():
            hidden = reference(ids, output_hidden_states=True).hidden_states[2][0, -1].numpy()
        assert vectors[caption].shape == (96,)
        np.testing.assert_allclose(vectors[caption], hidden, rtol=1e-5, atol=1e-5)
