"""The generation CLI (`python -m ella_jax.generate`) on the tiny reference models, and the
caption-upsampling helper. Few runs, shared by module-scoped fixtures: each loads and compiles."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REFERENCE, ROOT, upload
from PIL import Image

from ella_jax import storage
from ella_jax.captions import INSTRUCTION, build_messages, upsample_caption
from ella_jax.generate import main, slugify
from ella_jax.images import GAP_GREY

MODELS = [
    "--sd", str(REFERENCE / "sd"),
    "--t5", str(REFERENCE / "t5"),
    "--ella", str(REFERENCE / "ella.safetensors"),
    "--ella-heads", "4",
    "--size", "16",
    "--steps", "2",
]  # fmt: skip
PROMPTS = ["A red cube, on a table!", "two blue balls", "a cat " + "very " * 20 + "fluffy"]
NAMES = [f"{i}_{slugify(prompt)}.png" for i, prompt in enumerate(PROMPTS)]


UPSAMPLED = "in a garden under a starry sky"


def detailing_reply(messages: list[dict[str, str]]) -> str:
    """A fake LLM for --upsample-captions: the last user turn with words added, padded."""
    return f"  {messages[-1]['content']} {UPSAMPLED}\n"


def prompt_args() -> list[str]:
    return [arg for prompt in PROMPTS for arg in ("--prompt", prompt)]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    """The three prompts in one batch of 3."""
    out = tmp_path_factory.mktemp("batched")
    assert (
        main([*MODELS, *prompt_args(), "--batch-size", "3", "--seed", "7", "--out", str(out)]) == 0
    )
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The same prompts one at a time, with the SD comparison."""
    out = tmp_path_factory.mktemp("single")
    argv = [*MODELS, *prompt_args(), "--batch-size", "1", "--seed", "7", "--out", str(out)]
    assert main([*argv, "--compare-sd"]) == 0
    return out


def test_slugify():
    assert slugify("A Red cube, on a table!") == "a-red-cube-on-a-table"
    assert len(slugify("word " * 40)) <= 60
    assert slugify("¿¡!") == "prompt"


def test_one_png_per_prompt_with_metadata_and_grid(batched):
    assert sorted(p.name for p in batched.iterdir()) == sorted([*NAMES, "grid.png"])
    for i, (name, prompt) in enumerate(zip(NAMES, PROMPTS, strict=True)):
        image = Image.open(batched / name)
        assert image.size == (16, 16)
        assert image.text["prompt"] == prompt
        metadata = json.loads(image.text["ella-jax"])
        assert metadata["prompt"] == prompt and metadata["seed"] == 7 + i
        assert metadata["steps"] == 2 and metadata["size"] == 16 and metadata["mode"] == "ella"
        assert metadata["scheduler"] == "dpm"  # the --scheduler name of the folder's class
    # Three 16x16 images: a near-square grid of 2 columns and 2 rows, 2 px grey lines around
    # and between the cells; the empty fourth cell grey, not a black image.
    grid_image = pixels(batched / "grid.png")
    assert grid_image.shape == (2 + 2 * 18, 2 + 2 * 18, 3)
    assert (grid_image[:2] == GAP_GREY).all() and (grid_image[:, 16:20][2:18] != 0).any()
    assert (grid_image[20:36, 20:36] == GAP_GREY).all()
    grid_metadata = json.loads(Image.open(batched / "grid.png").text["ella-jax"])
    assert grid_metadata["prompts"] == PROMPTS and "row-major" in grid_metadata["cells"]


def test_compare_grid_has_both_renders(single):
    """--compare-sd's grid.png: a prompt a row, ELLA left and plain SD right."""
    grid_image = pixels(single / "grid.png")
    assert grid_image.shape == (2 + 3 * 18, 2 + 2 * 18, 3)
    for i, name in enumerate(NAMES):
        pair = pixels(single / name.replace(".png", "_compare.png"))
        row = grid_image[2 + 18 * i : 18 + 18 * i]
        np.testing.assert_array_equal(row[:, 2:18], pair[2:18, 2:18])
        np.testing.assert_array_equal(row[:, 20:36], pair[2:18, 20:36])


def test_batch_size_does_not_change_images(batched, single):
    for name in NAMES:
        difference = np.abs(pixels(batched / name) - pixels(single / name)).max()
        assert difference <= 1, name


def test_compare_sd(single):
    for name in NAMES:
        compare = single / name.replace(".png", "_compare.png")
        assert Image.open(compare).size == (2 + 2 * 18, 2 + 18)  # two cells, 2 px lines
        # ELLA's image is the left cell.
        assert np.array_equal(pixels(compare)[2:18, 2:18], pixels(single / name))


def test_upsampled_captions_reach_the_encoders(batched, tmp_path, monkeypatch):
    """The upsampler's caption, not the prompt, is what T5 encodes; the images (the batched
    run's batch and seeds, so only the text differs) change, and the metadata keeps both."""
    from ella_jax.pipeline import ELLAPipeline

    encoded = []
    encode_prompt = ELLAPipeline.encode_prompt

    def recording(self, prompts, *args, **kwargs):
        encoded.extend(prompts)
        return encode_prompt(self, prompts, *args, **kwargs)

    monkeypatch.setattr(ELLAPipeline, "encode_prompt", recording)
    argv = [*MODELS, *prompt_args(), "--batch-size", "3", "--seed", "7", "--out", str(tmp_path)]
    assert main([*argv, "--upsample-captions", f"{__name__}:detailing_reply"]) == 0
    assert {f"{prompt} {UPSAMPLED}" for prompt in PROMPTS} <= set(encoded)
    assert not set(PROMPTS) & set(encoded)
    for name, prompt in zip(NAMES, PROMPTS, strict=True):
        metadata = json.loads(Image.open(tmp_path / name).text["ella-jax"])
        assert metadata["prompt"] == prompt
        assert metadata["upsampled_prompt"] == f"{prompt} {UPSAMPLED}"
        # The tiny random UNet barely listens to its context: a pixel level or so, but not 0.
        assert np.abs(pixels(tmp_path / name) - pixels(batched / name)).max() > 0, name


def test_models_and_outputs_in_a_bucket(batched, buckets):
    """Model folders read from a GCS bucket (fake-gcs-server) and the image written there: the
    local run's pixels."""
    bucket = buckets("gs")
    for name in ("sd", "t5", "ella.safetensors"):
        upload(REFERENCE / name, f"{bucket}/{name}")
    models = [f"{bucket}/{a[len(str(REFERENCE)) + 1 :]}" if a.startswith(str(REFERENCE)) else a
              for a in MODELS]  # fmt: skip
    argv = ["--prompt", PROMPTS[0], "--batch-size", "3", "--seed", "7", "--out", f"{bucket}/out"]
    assert main([*models, *argv]) == 0
    image = io.BytesIO(storage.path(f"{bucket}/out/{NAMES[0]}").read_bytes())
    np.testing.assert_array_equal(pixels(image), pixels(batched / NAMES[0]))
    assert not (ROOT / "gs:").exists()


def test_dpg_bench_grids_and_resume(tmp_path, capsys):
    """Grids of 4 in DPG-Bench's layout, and settings.json; a rerun resumes (nothing drawn),
    a rerun with other --steps is one error line, and --overwrite draws them all again."""
    tsv = tmp_path / "prompts.tsv"
    tsv.write_text("item_id\tprompt\nA1\ta red cube on a table\nb_2\ttwo dogs in the snow\n")
    out = tmp_path / "out"
    # A batch of 3 images straddles the two prompts' grids of 4.
    argv = [*MODELS, "--dpg-bench", str(tsv), "--batch-size", "3", "--out", str(out)]
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["A1.png", "b_2.png", "settings.json"]
    for name in ("A1.png", "b_2.png"):
        image = Image.open(out / name)
        assert image.size == (32, 32)
        assert json.loads(image.text["ella-jax"])["seeds"] == [0, 1, 2, 3]
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 of 2 prompts already done" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes
    (out / "A1.png").unlink()
    changed = [arg if arg != "2" else "3" for arg in argv]  # --steps 3
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: its grids were drawn with other settings")
    assert "steps 2 -> 3" in err and err.count("\n") == 1
    assert not (out / "A1.png").exists()
    assert main([*changed, "--overwrite"]) == 0
    assert json.loads(Image.open(out / "b_2.png").text["ella-jax"])["steps"] == 3
    assert json.loads((out / "settings.json").read_text())["steps"] == 3


def test_an_output_folder_is_new_or_replaced_whole(tmp_path, capsys):
    """A --out with another run's files is refused in one line; --overwrite replaces it whole
    (no old grid.png beside the new images); a run that fails leaves no folder."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "grid.png").write_bytes(b"an earlier run's")
    argv = [*MODELS, "--prompt", PROMPTS[0], "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out}: not empty") and err.count("\n") == 1
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [NAMES[0]]
    failing = tmp_path / "failing.py"
    failing.write_text("def reply(messages):\n    raise OSError('the LLM is down')\n")
    failed = tmp_path / "failed"
    argv = [*MODELS, "--prompt", PROMPTS[0], "--out", str(failed)]
    assert main([*argv, "--upsample-captions", f"{failing}:reply"]) == 2
    assert "the LLM is down" in capsys.readouterr().err
    assert not failed.exists()


def test_missing_prompts_file_is_one_error_line(tmp_path, capsys):
    argv = [*MODELS, "--prompts-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "missing.txt" in err


def test_upsample_caption():
    def reply(text):
        return lambda messages: text

    assert upsample_caption("a cat", reply("  A fluffy grey cat sits on a mat.\n")) == (
        "A fluffy grey cat sits on a mat."
    )
    assert upsample_caption("a cat", reply("  \n")) == "a cat"
    messages = build_messages("a cat")
    assert messages[0] == {"role": "system", "content": INSTRUCTION}
    assert messages[-1] == {"role": "user", "content": "a cat"}
    assert [m["role"] for m in messages[1:-1]] == ["user", "assistant"] * 4


def test_every_sampling_flag_reaches_the_pipeline(tmp_path, monkeypatch):
    """--mode, --negative-prompt, --token-length, --dtype and --scheduler: what the pipeline
    is built and called with (recorded on the way), and what each PNG says it was made with."""
    from ella_jax.pipeline import ELLAPipeline

    built, called = [], []
    from_pretrained, call = ELLAPipeline.from_pretrained.__func__, ELLAPipeline.__call__

    def recording_build(cls, *args, **kwargs):
        built.append(kwargs)
        return from_pretrained(cls, *args, **kwargs)

    def recording_call(self, prompts, **kwargs):
        called.append(kwargs)
        return call(self, prompts, **kwargs)

    monkeypatch.setattr(ELLAPipeline, "from_pretrained", classmethod(recording_build))
    monkeypatch.setattr(ELLAPipeline, "__call__", recording_call)
    flags = dict(mode="ella+clip", negative_prompt="blurry", token_length="flexible",
                 dtype="bfloat16", scheduler="ddim")  # fmt: skip
    argv = [*MODELS, "--prompt", PROMPTS[0], "--out", str(tmp_path)]
    argv += [f"--{key.replace('_', '-')}={value}" for key, value in flags.items()]
    assert main(argv) == 0
    assert built[0]["dtype"] == "bfloat16" and built[0]["scheduler"] == "ddim"
    assert {k: called[0][k] for k in ("mode", "negative_prompt", "token_length")} == {
        "mode": "ella+clip", "negative_prompt": "blurry", "token_length": "flexible"}  # fmt: skip
    metadata = json.loads(Image.open(tmp_path / NAMES[0]).text["ella-jax"])
    assert {key: metadata[key] for key in flags} == flags


def test_sur_adapter_renders_without_t5_or_ella(batched, tmp_path, capsys):
    """--sur alone: mode sur (CLIP through the adapter), no T5 needed; its images are not the
    ELLA ones; an ELLA mode without --t5 is one error line."""
    sur = str(REFERENCE / "sur" / "sur_adapter.safetensors")
    models = ["--sd", str(REFERENCE / "sd"), "--size", "16", "--steps", "2"]
    argv = [*models, "--sur", sur, "--sur-mode", "fixed", *prompt_args(), "--seed", "7"]
    assert main([*argv, "--batch-size", "3", "--out", str(tmp_path / "sur")]) == 0
    for name in NAMES:
        assert pixels(tmp_path / "sur" / name).shape == (16, 16, 3)
    assert np.any(pixels(tmp_path / "sur" / NAMES[0]) != pixels(batched / NAMES[0]))
    capsys.readouterr()
    assert main([*models, "--mode", "ella", "--prompt", "a", "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "needs --t5" in err


def test_a_runs_export_is_sampled_as_the_run_trained(uninterrupted, tmp_path, capsys):
    """A tiny run's export as older versions wrote it, without the run's settings in its
    metadata (4 heads; its config.json made to say padding masked at 16 tokens), given as the
    file or as the work directory with no --ella-heads, --size or --token-length, renders what
    the same command renders with the run's values; before, the defaults were fixed tokens at
    512 px. A flag that contradicts the run is one error line."""
    import safetensors.numpy

    from ella_jax.weights.trained_run import METADATA_KEY

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir, ignore=shutil.ignore_patterns("checkpoints"))
    config = json.loads((workdir / "config.json").read_text())
    (workdir / "config.json").write_text(json.dumps({**config, "mask_padding": True,
                                                     "token_length": 16}))  # fmt: skip
    with safetensors.safe_open(workdir / "ella.safetensors", framework="numpy") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
        metadata = {k: v for k, v in f.metadata().items() if k != METADATA_KEY}
    safetensors.numpy.save_file(tensors, workdir / "ella.safetensors", metadata)
    base = ["--sd", str(REFERENCE / "sd"), "--t5", str(REFERENCE / "t5"), "--steps", "2"]
    base += ["--prompt", PROMPTS[0], "--prompt", PROMPTS[2]]
    export = str(workdir / "ella.safetensors")
    runs = {
        "file": ["--ella", export],
        "workdir": ["--ella", str(workdir)],
        "explicit": ["--ella", export, "--ella-heads", "4", "--size", "16",
                     "--token-length", "flexible"],
    }  # fmt: skip
    for name, flags in runs.items():
        assert main([*base, *flags, "--out", str(tmp_path / name)]) == 0, name
    for image in NAMES[:1]:
        expected = pixels(tmp_path / "explicit" / image)
        assert expected.shape == (16, 16, 3)
        for name in ("file", "workdir"):
            np.testing.assert_array_equal(pixels(tmp_path / name / image), expected)
    metadata = json.loads(Image.open(tmp_path / "file" / NAMES[0]).text["ella-jax"])
    assert (metadata["size"], metadata["token_length"]) == (16, "flexible")
    capsys.readouterr()
    argv = [*base, "--ella", export, "--token-length", "fixed", "--out", str(tmp_path / "x")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --token-length fixed: ") and err.count("\n") == 1, err
    assert str(workdir / "config.json") in err


def test_a_work_directory_without_its_export_is_one_error_line(uninterrupted, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir, ignore=shutil.ignore_patterns("checkpoints"))
    (workdir / "ella.safetensors").unlink()
    base = ["--sd", str(REFERENCE / "sd"), "--t5", str(REFERENCE / "t5"), "--prompt", "a"]
    assert main([*base, "--ella", str(workdir), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {workdir}: a work directory without its export"), err
    assert "python -m convert export" in err and err.count("\n") == 1


def test_no_torch_warning_where_torch_is_missing():
    """Loading a tokenizer where torch is not installed (find_spec says so, as transformers
    checks) prints nothing: transformers' "PyTorch was not found" advice is silenced."""
    code = (
        "import importlib.util\n"
        "find_spec = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'torch' "
        "else find_spec(name, *a)\n"
        "from ella_jax.text import load_tokenizer\n"
        f"load_tokenizer({str(REFERENCE / 't5')!r})\n"
        "import transformers.utils as u\n"
        "assert not u.is_torch_available()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "PyTorch was not found" not in done.stderr + done.stdout, done.stderr


def tree(folder) -> dict:
    """Every entry under `folder`: its bytes (files), mode and kind, by relative path."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        kind = "dir" if path.is_dir() else path.read_bytes()
        entries[str(path.relative_to(folder))] = (kind, path.stat().st_mode)
    return entries


@pytest.fixture
def run_copy(uninterrupted, tmp_path):
    """A copy of the tiny run's work directory, with a stand-in checkpoint."""
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir, ignore=shutil.ignore_patterns("checkpoints"))
    (workdir / "checkpoints" / "12").mkdir(parents=True)
    (workdir / "checkpoints" / "12" / "state").write_bytes(b"weights")
    return workdir


def test_an_output_never_touches_an_input(run_copy, tmp_path, capsys):
    """--out on the connector's work directory, on a folder holding it, inside it or through a
    link to it is refused before anything loads, --overwrite or not: the run stays byte for
    byte (before, --out RUN --overwrite deleted the training run)."""
    before = tree(tmp_path)
    (tmp_path.parent / "alias").symlink_to(run_copy)
    base = ["--sd", str(REFERENCE / "sd"), "--t5", str(REFERENCE / "t5"), "--prompt", "a"]
    outs = {run_copy: "--ella", tmp_path: "--ella", run_copy / "samples": "--ella",
            tmp_path.parent / "alias": "--ella", REFERENCE / "sd" / "x": "--sd"}  # fmt: skip
    for out, flag in outs.items():
        assert main([*base, "--ella", str(run_copy), "--out", str(out), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out {out}: overlaps {flag} "), err
        assert err.count("\n") == 1
    assert tree(tmp_path) == before


def test_overwrite_replaces_only_outputs_of_this_command(tmp_path, capsys):
    """--overwrite of a folder of other files is refused (naming one); of an earlier output,
    reached through a link, it keeps the folder (mode 700, the link) and holds just the new
    images; "." is the working directory."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    argv = [*MODELS, "--prompt", PROMPTS[0], "--overwrite"]
    assert main([*argv, "--out", str(mine)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {mine}: holds notes.txt") and err.count("\n") == 1
    assert (mine / "notes.txt").read_text() == "keep me"

    target = tmp_path / "target"
    target.mkdir()
    target.chmod(0o700)
    (target / "0_an-earlier-prompt.png").write_bytes(b"earlier")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert main([*argv, "--out", str(link)]) == 0
    assert link.is_symlink() and (target.stat().st_mode & 0o777) == 0o700
    assert [p.name for p in target.iterdir()] == [NAMES[0]]

    empty = tmp_path / "empty"
    empty.mkdir()
    os.chdir(empty)
    try:
        assert main([*MODELS, "--prompt", PROMPTS[0], "--out", "."]) == 0
    finally:
        os.chdir(ROOT)
    assert [p.name for p in empty.iterdir()] == [NAMES[0]]
    assert not [p for p in tmp_path.iterdir() if storage.is_staging(p.name)]


def test_bad_numbers_are_refused_where_typed(tmp_path, capsys):
    """--guidance nan once wrote an all-black PNG; every numeric flag is checked by argparse
    (one error line naming it and the value, exit status 2), before anything loads."""
    cases = {
        ("--guidance", "nan"): "'nan' is not a finite number",
        ("--guidance", "inf"): "'inf' is not a finite number",
        ("--steps", "0"): "0 is less than 1",
        ("--size", "-16"): "-16 is less than 1",
        ("--batch-size", "0"): "0 is less than 1",
        ("--limit", "two"): "'two' is not an integer",
        ("--text-layer", "-1"): "-1 is less than 0",
    }
    for (flag, value), message in cases.items():
        with pytest.raises(SystemExit) as exited:
            main([*MODELS, "--prompt", "a", "--out", str(tmp_path / "out"), flag, value])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert f"error: argument {flag}: {message}" in err, err
    assert not (tmp_path / "out").exists()


def test_prompts_files_that_are_not_utf8_are_one_error_line(tmp_path, capsys):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("a red cube\nun caf\xe9 rouge\n".encode("latin-1"))
    binary = tmp_path / "prompts.tsv"
    binary.write_bytes(b"A1\ta cat\n\x89PNG\r\n\x1a\n\x00\xff")
    csv = tmp_path / "dpg_bench.csv"
    csv.write_bytes("item_id,text\nA1,un caf\xe9\n".encode("latin-1"))
    cases = (("--prompts-file", latin, 2), ("--dpg-bench", binary, 2), ("--dpg-bench", csv, 2))
    for flag, path, line in cases:
        assert main([*MODELS, flag, str(path), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}:{line}: not UTF-8 text") and err.count("\n") == 1


def test_ella_without_a_text_model_is_one_error_line(tmp_path, capsys):
    argv = ["--sd", str(REFERENCE / "sd"), "--ella", str(REFERENCE / "ella.safetensors")]
    assert main([*argv, "--mode", "clip", "--prompt", "a", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --ella ") and "needs --t5" in err and err.count("\n") == 1


def test_an_export_alone_is_sampled_as_its_run_trained(uninterrupted, tmp_path, capsys):
    """`convert export` of a run that masked its padding at 16 tokens and sampled with 2 steps
    at guidance 7.5, its file copied alone: generate with no flags renders what it renders
    with the run's values spelled out (before, the file alone sampled fixed 128 tokens with 50
    steps at 12); the settings survive to-jax; the trainer's own export carries its run's."""
    from ella_jax.convert.__main__ import main as convert
    from ella_jax.weights.tensors import read_safetensors_metadata
    from ella_jax.weights.trained_run import METADATA_KEY, trained_with

    trained = json.loads(
        read_safetensors_metadata(uninterrupted / "ella.safetensors")[METADATA_KEY]
    )
    assert trained["token_length"] == "fixed" and trained["max_tokens"] == 128
    assert (trained["sample_steps"], trained["sample_guidance"]) == (8, 7.5)
    assert trained["text_model"]["model_type"] == "t5" and trained["text_model"]["d_model"] == 96

    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    config = json.loads((workdir / "config.json").read_text())
    config.update(mask_padding=True, token_length=16, sample_steps=2)
    (workdir / "config.json").write_text(json.dumps(config))
    alone = tmp_path / "shared" / "ella.safetensors"
    alone.parent.mkdir()
    assert convert(["export", str(workdir), str(alone)]) == 0
    assert convert(["to-jax", str(alone), str(tmp_path / "converted")]) == 0
    assert trained_with(tmp_path / "converted").token_length == "flexible"

    base = ["--sd", str(REFERENCE / "sd"), "--t5", str(REFERENCE / "t5"), "--ella", str(alone)]
    base += ["--prompt", PROMPTS[2]]
    explicit = ["--size", "16", "--token-length", "flexible", "--steps", "2", "--guidance", "7.5"]
    assert main([*base, "--out", str(tmp_path / "alone")]) == 0
    assert main([*base, *explicit, "--out", str(tmp_path / "explicit")]) == 0
    name = f"0_{slugify(PROMPTS[2])}.png"
    np.testing.assert_array_equal(
        pixels(tmp_path / "alone" / name), pixels(tmp_path / "explicit" / name)
    )
    metadata = json.loads(Image.open(tmp_path / "alone" / name).text["ella-jax"])
    assert (metadata["token_length"], metadata["steps"], metadata["guidance"]) == (
        "flexible", 2, 7.5)  # fmt: skip
    assert metadata["sur"] is None and metadata["ella"] == str(alone)


def test_a_text_model_other_than_the_runs_is_refused_unless_forced(run_copy, tmp_path, capsys):
    """The run trained on the tiny T5; a Llama of the same width was accepted and drew
    nonsense. Refused in one line naming what differs; --force-text-model renders."""
    from conftest import tiny_llm_folder

    llm = tiny_llm_folder(tmp_path / "llm")
    argv = ["--sd", str(REFERENCE / "sd"), "--t5", str(llm), "--ella", str(run_copy)]
    argv += ["--prompt", "a", "--steps", "1"]
    assert main([*argv, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {llm}: not the text model the connector was trained on")
    assert "model_type 't5' -> 'llama'" in err and err.count("\n") == 1
    assert main([*argv, "--force-text-model", "--out", str(tmp_path / "forced")]) == 0


def test_ctrl_c_leaves_nothing_and_no_traceback(tmp_path):
    """SIGINT while rendering: exit status 130, one line, no traceback, no output folder and
    no staging folder left."""
    import signal

    from conftest import start, wait_for

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {i}" for i in range(200)))
    command = [sys.executable, "-m", "ella_jax.generate", *MODELS, "--prompts-file",
               str(prompts), "--batch-size", "1", "--out", str(tmp_path / "out")]  # fmt: skip
    log = tmp_path / "log.txt"
    process = start(command, log)
    wait_for(process, log, lambda text: "generating" in text, timeout=240)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    text = log.read_text()
    assert "Traceback" not in text and "interrupted" in text, text[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.txt", "prompts.txt"]
