"""ELLA checkpoint files and the conversion CLI: bit-identical round trips, the attention heads
read from what is stored with a file, and one clear line for every bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import safetensors.numpy
from conftest import REFERENCE, ROOT

from ella_jax import load_ella
from ella_jax.convert.__main__ import main

OFFICIAL = REFERENCE / "ella.safetensors"


def round_trip(src, tmp_path, *heads):
    assert main(["to-jax", str(src), str(tmp_path / "jax"), *heads]) == 0
    assert main(["to-torch", str(tmp_path / "jax"), str(tmp_path / "back.safetensors")]) == 0
    return safetensors.numpy.load_file(tmp_path / "back.safetensors")


def assert_bit_identical(original, back):
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert back[name].tobytes() == tensor.tobytes(), name


@pytest.mark.parametrize("name", ["ella.safetensors", "ella_fp16.safetensors"])
def test_fixture_round_trip_is_bit_identical(name, tmp_path):
    back = round_trip(REFERENCE / name, tmp_path, "--heads", "4")
    assert_bit_identical(safetensors.numpy.load_file(REFERENCE / name), back)
    assert json.loads((tmp_path / "jax" / "config.json").read_text())["heads"] == 4


def test_released_layout_round_trip_is_bit_identical(released_checkpoint, tmp_path):
    back = round_trip(released_checkpoint, tmp_path)
    # Nothing stored with the file, the released shapes: the released model's 8 heads.
    assert json.loads((tmp_path / "jax" / "config.json").read_text())["heads"] == 8
    original = safetensors.numpy.load_file(released_checkpoint)
    assert len(original) == 93 and sum(t.size for t in original.values()) > 66_000_000
    assert_bit_identical(original, back)


def test_converted_directory_remembers_heads(tmp_path):
    main(["to-jax", str(OFFICIAL), str(tmp_path / "jax"), "--heads", "4"])
    model, params = load_ella(tmp_path / "jax")
    reference_model, reference_params = load_ella(OFFICIAL, heads=4)
    assert model.heads == 4 and model == reference_model
    features = np.load(REFERENCE / "ella_io.npz")["features"]
    np.testing.assert_array_equal(
        model.apply({"params": params}, features, 500.0),
        reference_model.apply({"params": reference_params}, features, 500.0),
    )


def corrupt(tmp_path, edit):
    """A copy of the fixture checkpoint with its tensors changed by `edit(tensors)`."""
    tensors = safetensors.numpy.load_file(OFFICIAL)
    edit(tensors)
    path = tmp_path / "bad.safetensors"
    safetensors.numpy.save_file(tensors, path)
    return path


def alone(tmp_path):
    """The fixture checkpoint in a folder of its own: no ella_config.json beside it."""
    path = tmp_path / "alone.safetensors"
    shutil.copy(OFFICIAL, path)
    return path


def truncated(tmp_path):
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(OFFICIAL.read_bytes()[:5000])
    return path


def not_safetensors(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("this is not a checkpoint\n")
    return path


def missing_tensor(tmp_path):
    return corrupt(tmp_path, lambda t: t.pop("connector.perceiver_blocks.1.ln_ff.linear.bias"))


def unexpected_tensor(tmp_path):
    return corrupt(tmp_path, lambda t: t.update({"connector.proj_out.weight": np.zeros((2, 2))}))


def wrong_shape(tmp_path):
    return corrupt(
        tmp_path, lambda t: t.update({"connector.proj_in.bias": np.zeros(65, np.float32)})
    )


BAD_INPUTS = {
    truncated: ["truncated.safetensors", "not a readable safetensors file"],
    not_safetensors: ["notes.safetensors", "not a readable safetensors file"],
    missing_tensor: ["missing tensor", "connector.perceiver_blocks.1.ln_ff.linear.bias"],
    unexpected_tensor: ["unexpected tensor", "connector.proj_out.weight"],
    wrong_shape: ["connector.proj_in.bias", "(65,)", "(64,)"],
    alone: ["heads=5 does not divide width=64"],
    (lambda tmp_path: OFFICIAL): ["heads=5 was asked for", "ella_config.json says heads=4"],
    (lambda tmp_path: tmp_path / "absent.safetensors"): ["absent.safetensors", "no such file"],
}


@pytest.mark.parametrize("make_input", BAD_INPUTS, ids=lambda f: f.__name__)
def test_bad_input_is_one_line_and_leaves_nothing(make_input, tmp_path, capsys):
    src = make_input(tmp_path)
    heads = ["--heads", "5" if make_input is alone or src == OFFICIAL else "4"]
    dst = tmp_path / "out"
    assert main(["to-jax", str(src), str(dst), *heads]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    for fragment in BAD_INPUTS[make_input]:
        assert fragment in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [src.name] if src.parent == tmp_path and src.exists() else []
    )


def test_bad_converted_directory_names_the_file(tmp_path, capsys):
    main(["to-jax", str(OFFICIAL), str(tmp_path / "jax"), "--heads", "4"])
    params = safetensors.numpy.load_file(tmp_path / "jax" / "params.safetensors")
    params.pop("connector/latents")
    safetensors.numpy.save_file(params, tmp_path / "jax" / "params.safetensors")
    capsys.readouterr()
    assert main(["to-torch", str(tmp_path / "jax"), str(tmp_path / "back.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "params.safetensors" in err and "'connector/latents'" in err
    assert not (tmp_path / "back.safetensors").exists()


def test_existing_destination_is_kept_without_overwrite(tmp_path, capsys):
    dst = tmp_path / "jax"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["to-jax", str(OFFICIAL), str(dst), "--heads", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert main(["to-jax", str(OFFICIAL), str(dst), "--heads", "4", "--overwrite"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "params.safetensors"]


def test_command_line_help_and_exit_status(tmp_path):
    """As a user runs it: --help explains, a bad input exits 2 with no traceback."""
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "convert", *a], capture_output=True, text=True, cwd=ROOT
    )
    help_text = run("--help").stdout
    assert "to-jax" in help_text and "to-torch" in help_text and "bit for bit" in help_text
    result = run("to-jax", str(tmp_path / "absent.safetensors"), str(tmp_path / "out"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("absent.safetensors: no such file or directory")
    shutil.rmtree(tmp_path)


def test_heads_are_read_from_what_is_stored_with_the_file(tmp_path):
    """The fixture connector has 4 heads (its tensors cannot say so). An export carries them
    in its safetensors metadata; an ella_config.json beside a file carries them too; a file
    with neither and shapes other than the released model's needs them given; a given value
    that contradicts the stored one, or a stored config that contradicts the tensors, is an
    error."""
    import safetensors.torch

    from bench.torch_ella import TorchELLA
    from ella_jax.weights.ella import write_official
    from ella_jax.weights.tensors import CheckpointError

    model, params = load_ella(OFFICIAL)  # tests/fixtures/reference/ella_config.json: 4 heads
    assert model.heads == 4
    config = json.loads((REFERENCE / "ella_config.json").read_text())

    exported = tmp_path / "exported" / "ella.safetensors"
    write_official(exported, params, config=config)
    assert load_ella(exported)[0].heads == 4
    # The official loader ignores the metadata: the file loads as it always did.
    reference = TorchELLA(**config)
    reference.load_state_dict(safetensors.torch.load_file(exported))
    with pytest.raises(CheckpointError, match=r"heads=8 was asked for, .*metadata.*says heads=4"):
        load_ella(exported, heads=8)

    beside = tmp_path / "beside" / "ella.safetensors"
    write_official(beside, params)
    with pytest.raises(CheckpointError, match="stored neither in its metadata nor in an ella_"):
        load_ella(beside)
    assert load_ella(beside, heads=2)[0].heads == 2
    (beside.parent / "ella_config.json").write_text(json.dumps(config))
    assert load_ella(beside)[0].heads == 4

    (exported.parent / "ella_config.json").write_text(json.dumps({**config, "heads": 2}))
    with pytest.raises(CheckpointError, match=r"says heads=4, .*ella_config.json heads=2"):
        load_ella(exported)
    (beside.parent / "ella_config.json").write_text(json.dumps({**config, "width": 32}))
    with pytest.raises(CheckpointError, match=r"width=32, but the tensors of .* have width=64"):
        load_ella(beside)


def test_info_describes_the_checkpoint_and_runs_it(capsys):
    """`convert info` on the fixture ELLA: its config (heads from ella_config.json beside it),
    the parameter count of the file's tensors, a finite forward pass of the asked shape."""
    tensors = safetensors.numpy.load_file(REFERENCE / "ella.safetensors")
    count = sum(t.size for t in tensors.values())
    assert main(["info", str(REFERENCE / "ella.safetensors"), "--batch", "3", "--tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "width=64 layers=2 heads=4 num_latents=16 input_dim=96" in out
    assert f"{count:,} parameters in {len(tensors)} tensors" in out
    assert "features (3, 5, 96) at timestep 999 -> (3, 16, 64) float32, finite=True" in out


def test_a_work_directory_stands_for_its_export(uninterrupted, tmp_path, capsys):
    """`convert info` and `to-jax` on a run's --workdir read its export (before: the run's
    config.json was taken for a converted checkpoint's and refused)."""
    assert main(["info", str(uninterrupted), "--tokens", "5"]) == 0
    assert "width=64 layers=2 heads=4 num_latents=16 input_dim=96" in capsys.readouterr().out
    assert main(["to-jax", str(uninterrupted), str(tmp_path / "jax")]) == 0
    original = safetensors.numpy.load_file(uninterrupted / "ella.safetensors")
    _, params = load_ella(tmp_path / "jax")
    assert sum(p.size for p in jax.tree.leaves(params)) == sum(t.size for t in original.values())


def test_export_of_a_folder_that_is_no_work_directory_says_so(tmp_path, capsys):
    """A converted checkpoint's folder (its config.json is the model's): one line that says
    what the folder is not, instead of a missing ella_config.json."""
    assert main(["to-jax", str(REFERENCE / "ella.safetensors"), str(tmp_path / "jax"),
                 "--heads", "4"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["export", str(tmp_path / "jax"), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'jax'}: not the work directory of a training run")
    assert err.count("\n") == 1 and not (tmp_path / "out.safetensors").exists()


def test_installed_names_are_the_projects_own(tmp_path):
    """Outside the repository, `train` and `convert` are not importable (generic names are not
    installed) while the console scripts run: `ella-jax-convert --help` exits 0."""
    outside = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('train'), "
         "u.find_spec('convert'), u.find_spec('ella_jax.train.main') is not None)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert outside.stdout.split() == ["None", "None", "True"], outside.stderr
    script = Path(sys.executable).parent / "ella-jax-convert"
    done = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0 and "export" in done.stdout, done.stderr


def test_configs_find_the_repository_models_from_anywhere(tmp_path, monkeypatch):
    from conftest import project_config

    monkeypatch.chdir(tmp_path)
    for name in ("tiny", "toy"):
        config = project_config(name)
        assert Path(config.sd, "unet", "config.json").is_file(), (name, config.sd)
