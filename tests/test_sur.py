"""SUR-adapter: the module against the official numbers (fixtures/reference/sur), the fixed
attention and the exports against the official class (tests/torch_sur.py, itself checked against
the same numbers first), the losses, conversions and their errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import REFERENCE, relative_error

from ella_jax import load_sur_adapter
from ella_jax.convert.__main__ import main
from ella_jax.sur import cosine_loss, distillation_kl

SUR = REFERENCE / "sur"
IO = dict(np.load(SUR / "sur_io.npz"))


def torch_adapter(path, batch_first=False):
    """The official class with the weights of an official file, strictly loaded."""
    import safetensors.torch
    import torch
    from torch_sur import Adapter

    config = json.loads((path.parent / "sur_config.json").read_text())
    adapter = Adapter(**config, batch_first=batch_first).eval()
    adapter.load_state_dict(safetensors.torch.load_file(path), strict=True)
    torch.set_grad_enabled(False)
    return adapter


@pytest.mark.parametrize("batch", [2, 3])
def test_official_mode_reproduces_the_official_module(batch):
    model, params = load_sur_adapter(SUR / "sur_adapter.safetensors", mode="official")
    out, encoder_out, llm_out = jax.jit(model.apply)({"params": params}, IO[f"x{batch}"])
    assert relative_error(out, IO[f"out{batch}"]) < 1e-5
    assert relative_error(encoder_out, IO[f"encoder{batch}"]) < 1e-5
    assert relative_error(llm_out, IO[f"llm{batch}"]) < 1e-5


def test_the_torch_reference_is_the_official_module():
    import torch

    adapter = torch_adapter(SUR / "sur_adapter.safetensors")
    outputs = adapter(torch.from_numpy(IO["x3"]))
    for name, found in zip(("out3", "encoder3", "llm3"), outputs, strict=True):
        assert relative_error(found.numpy(), IO[name]) < 1e-5


def test_fixed_mode_attends_over_tokens_and_each_prompt_alone():
    import torch

    model, params = load_sur_adapter(SUR / "sur_adapter.safetensors", mode="fixed")
    apply = jax.jit(model.apply)
    together = apply({"params": params}, IO["x3"])
    # batch_first=True: torch's encoder then attends over the 77 tokens.
    expected = torch_adapter(SUR / "sur_adapter.safetensors", batch_first=True)(
        torch.from_numpy(IO["x3"])
    )
    for found, want in zip(together, expected, strict=True):
        assert relative_error(found, want.numpy()) < 1e-5
    alone = apply({"params": params}, IO["x3"][1:2])[0]
    np.testing.assert_allclose(alone[0], together[0][1], atol=1e-6)
    # The official mode mixes the batch: a prompt's output depends on its neighbours.
    official, _ = load_sur_adapter(SUR / "sur_adapter.safetensors", mode="official")
    mixed = jax.jit(official.apply)({"params": params}, IO["x3"])[1]  # the encoder's output
    assert relative_error(mixed[1], together[1][1]) > 1e-2


def test_dropout_runs_only_when_asked_for():
    model, params = load_sur_adapter(SUR / "sur_adapter.safetensors")
    x = IO["x2"]
    eval_out = model.apply({"params": params}, x)[1]
    train_out = model.apply(
        {"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(1)}
    )[1]
    assert relative_error(eval_out, IO["encoder2"]) < 1e-5
    assert relative_error(train_out, IO["encoder2"]) > 1e-3


def test_losses_reproduce_the_training_script():
    assert abs(float(distillation_kl(IO["kl_x"], IO["kl_y"])) - IO["kl_t1"]) <= 1e-6 * max(
        1, abs(IO["kl_t1"])
    )
    found = float(distillation_kl(IO["kl_x"], IO["kl_y"], temperature=2.0))
    assert abs(found - IO["kl_t2"]) <= 1e-6 * max(1, abs(IO["kl_t2"]))
    assert abs(float(cosine_loss(IO["cos_a"], IO["cos_b"])) - IO["cos"]) <= 1e-6


def test_learned_eta_starts_at_the_official_mix():
    from ella_jax.models.sur_adapter import SURAdapter

    model = SURAdapter(width=64, learned_eta=True, eta=0.1)
    params = model.init(jax.random.key(0), IO["x2"])["params"]
    fixed = SURAdapter(width=64, eta=0.1)
    without_head = {k: v for k, v in params.items() if k != "eta_head"}
    np.testing.assert_allclose(
        model.apply({"params": params}, IO["x2"])[0],
        fixed.apply({"params": without_head}, IO["x2"])[0],
        atol=1e-6,
    )


def test_conversion_round_trip_is_bit_identical(tmp_path):
    assert main(["sur-to-jax", str(SUR / "sur_adapter.safetensors"), str(tmp_path / "jax")]) == 0
    out = tmp_path / "back" / "sur_adapter.safetensors"
    assert main(["sur-to-torch", str(tmp_path / "jax"), str(out)]) == 0
    original = safetensors.numpy.load_file(SUR / "sur_adapter.safetensors")
    back = safetensors.numpy.load_file(out)
    assert set(back) == set(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and np.array_equal(back[name], tensor), name
    assert json.loads((out.parent / "sur_config.json").read_text()) == json.loads(
        (SUR / "sur_config.json").read_text()
    )
    model, params = load_sur_adapter(tmp_path / "jax")
    found = jax.jit(model.apply)({"params": params}, IO["x2"])[0]
    assert relative_error(found, IO["out2"]) < 1e-5
    torch_adapter(out)  # loads strictly in the official class


def test_learned_eta_head_travels_beside_the_official_file(tmp_path):
    from ella_jax.weights.sur import read_sur_adapter, write_official

    config, params = read_sur_adapter(SUR / "sur_adapter.safetensors")
    head = {
        "linear1": {"kernel": np.ones((64, 64), np.float32), "bias": np.zeros(64, np.float32)},
        "linear2": {"kernel": np.full((64, 1), 0.5, np.float32), "bias": np.ones(1, np.float32)},
    }
    write_official(tmp_path / "a.safetensors", {**params, "eta_head": head}, config)
    assert (tmp_path / "eta_head.safetensors").is_file()
    torch_adapter(tmp_path / "a.safetensors")  # the official file itself is still official
    model, loaded = load_sur_adapter(tmp_path / "a.safetensors")
    assert model.learned_eta
    np.testing.assert_array_equal(
        loaded["eta_head"]["linear2"]["kernel"], head["linear2"]["kernel"]
    )
    assert main(["sur-to-jax", str(tmp_path / "a.safetensors"), str(tmp_path / "jax")]) == 0
    assert load_sur_adapter(tmp_path / "jax")[0].learned_eta
    # An adapter without a head written beside it: the head is not left to be read as its own.
    with pytest.raises(FileExistsError, match="eta head"):
        write_official(tmp_path / "b.safetensors", params, config)
    assert not (tmp_path / "b.safetensors").exists()
    write_official(tmp_path / "b.safetensors", params, config, overwrite=True)
    assert not (tmp_path / "eta_head.safetensors").exists()
    assert not load_sur_adapter(tmp_path / "b.safetensors")[0].learned_eta


def test_released_shapes_load(tmp_path):
    shapes = json.loads((REFERENCE.parent / "sur_sd15_keys.json").read_text())
    rng = np.random.default_rng(0)
    tensors = {n: rng.standard_normal(s).astype(np.float16) for n, s in shapes.items()}
    safetensors.numpy.save_file(tensors, tmp_path / "sur.safetensors")
    (tmp_path / "sur_config.json").write_text(
        json.dumps({"depth": 2, "adapter_weight": 0.1, "sd_text_size": 768})
    )
    model, params = load_sur_adapter(tmp_path / "sur.safetensors")
    assert (model.depth, model.width) == (2, 768)
    assert jax.tree.leaves(params)[0].dtype == jnp.float16
    assert sum(p.size for p in jax.tree.leaves(params)) == sum(t.size for t in tensors.values())


def test_from_pt_reads_the_official_pickle(tmp_path):
    import torch

    state = torch_adapter(SUR / "sur_adapter.safetensors").state_dict()
    torch.save(state, tmp_path / "adapter.pt")
    out = tmp_path / "out" / "adapter.safetensors"
    assert main(["sur-from-pt", str(tmp_path / "adapter.pt"), str(out)]) == 0
    original = safetensors.numpy.load_file(SUR / "sur_adapter.safetensors")
    back = safetensors.numpy.load_file(out)
    assert set(back) == set(original)
    assert all(np.array_equal(back[n], t) for n, t in original.items())
    assert json.loads((out.parent / "sur_config.json").read_text())["adapter_weight"] == 0.1


def _write(tmp_path, tensors=None, config=None):
    source = safetensors.numpy.load_file(SUR / "sur_adapter.safetensors")
    safetensors.numpy.save_file(tensors(source) if tensors else source, tmp_path / "s.safetensors")
    if config is not False:
        base = json.loads((SUR / "sur_config.json").read_text())
        (tmp_path / "sur_config.json").write_text(json.dumps(config(base) if config else base))
    return tmp_path / "s.safetensors"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: _write(p, config=False), "no sur_config.json beside it"),
        (lambda p: _write(p, config=lambda c: {**c, "depth": 3}), "depth=3, but the tensors"),
        (lambda p: _write(p, config=lambda c: {**c, "heads": 8}), "unknown ['heads']"),
        (lambda p: _write(p, config=lambda c: {**c, "adapter_weight": 2}), "adapter_weight=2"),
        (
            lambda p: _write(p, tensors=lambda t: {k: v for k, v in t.items() if "value" not in k}),
            "missing tensor 'attention.value_layer.bias'",
        ),
        (
            lambda p: _write(p, tensors=lambda t: {**t, "extra": np.zeros(1, np.float32)}),
            "unexpected tensor 'extra'",
        ),
        (
            lambda p: _write(p, tensors=lambda t: {k: v for k, v in t.items() if k != "fc.weight"}),
            "no 2-d tensor 'fc.weight'",
        ),
    ],
)
def test_bad_files_are_one_line_errors_and_leave_nothing(make, message, tmp_path, capsys):
    source = make(tmp_path)
    assert main(["sur-to-jax", str(source), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()


def test_from_pt_without_torch_says_what_to_install(tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch":
            raise ImportError("no torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    (tmp_path / "a.pt").write_bytes(b"x")
    assert main(["sur-from-pt", str(tmp_path / "a.pt"), str(tmp_path / "a.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "needs torch" in err and err.count("\n") == 1
    assert not (tmp_path / "a.safetensors").exists()


def test_existing_outputs_are_kept_without_overwrite(tmp_path, capsys):
    (tmp_path / "sur_config.json").write_text(
        '{"depth": 2, "adapter_weight": 0.5, "sd_text_size": 64}'
    )
    assert main(["sur-to-jax", str(SUR / "sur_adapter.safetensors"), str(tmp_path / "jax")]) == 0
    assert main(["sur-to-torch", str(tmp_path / "jax"), str(tmp_path / "s.safetensors")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()
