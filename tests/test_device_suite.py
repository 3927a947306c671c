"""`python -m bench.device_suite --small [--model sdxl]`: the GPU suite's code end to end on the
CPU with tiny shapes of SD 1.5 and of SDXL (its added conditions), its JAX rows and its PyTorch +
diffusers rows, without the packages of the trainer's data and logging stack (a bare GPU image
has none of them)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# On the trainer's path but not the suite's: importing them fails in the suite's processes.
NOT_ON_A_GPU_IMAGE = ("grain", "ml_collections", "tensorboardX", "array_record")


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_small_suite_writes_every_row(tmp_path, model):
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in NOT_ON_A_GPU_IMAGE:
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name}: not on a GPU image')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(ROOT)])}
    out = tmp_path / "small.json"
    command = ["-m", "bench.device_suite", "--small", "--model", model, "--out", str(out)]
    done = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("train_step", "train_step_remat"):
        row = results[name]
        assert "error" not in row, row
        for key in ("samples_per_s", "step_seconds", "flops", "mfu", "peak_bytes"):
            assert row[key] > 0, (name, key, row[key])
        assert row["torch"]["samples_per_s"] > 0, row["torch"]
    assert results["train_step"]["remat"] == "none"
    assert results["train_step_remat"]["remat"] == "blocks"
    # Remat changes the work done, not the model: the same model FLOPs.
    assert results["train_step"]["flops"] == results["train_step_remat"]["flops"]
    for name, batch in (("sampler", 1), ("sampler_batched", 2)):
        row = results[name]
        assert row["batch"] == batch and row["seconds_per_image"] > 0, row
        assert row["torch"]["seconds_per_image"] > 0, row["torch"]
    assert results["connector"]["seconds"] > 0 and results["connector"]["torch"]["seconds"] > 0
    assert results["device"]["platform"] == "cpu"
    assert results["shapes"] == f"{model}-small"
    assert "| train_step (remat none, batch 4) |" in done.stdout
