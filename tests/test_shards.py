"""Parquet files (train.parquet) and the shards `python -m train.shards` writes: the same batches
as the manifest they were made from, missing values skipped and counted, bad files named; the
tiny run trained from parquet shards of data/tiny in a bucket."""

import shutil
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SHORT, read_metrics, relative_error, tiny_config
from test_webdataset import batches

from ella_jax import storage
from ella_jax.train import data, shards
from ella_jax.train.parquet import ParquetSource
from ella_jax.train.trainer import train

MANIFEST = ROOT / "data" / "tiny" / "captions.jsonl"


def test_parquet_shards_give_the_batches_of_their_manifest(tmp_path, capsys):
    arguments = ["--path", str(MANIFEST), "--out", str(tmp_path), "--format", "parquet"]
    assert shards.main([*arguments, "--per-shard", "12", "--row-group", "5"]) == 0
    assert "wrote 32 examples in 3 parquet shards" in capsys.readouterr().out
    source = data.open_source("parquet", str(tmp_path))
    assert len(source) == 32 and len(source.files) == 3 and len(source.groups) == 8
    records = data.read_manifest(MANIFEST)
    for got, expected in zip(batches(source, 3), batches(records, 3), strict=True):
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_missing_values_are_skipped_and_bad_files_named(tmp_path):
    """A row without an image or without a caption is read as skipped (where it was said);
    a list of captions gives them all; a missing column and a file that is not parquet are
    errors naming the file."""
    image = MANIFEST.with_name("images").joinpath("00.png").read_bytes()
    table = pa.table(
        {
            "jpg": [image, None, image, image],
            "caption": ["a", "b", None, "c"],
            "long": [["a long one", "another"], None, None, []],
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet", row_group_size=2)
    source = ParquetSource([tmp_path / "00000.parquet"], "jpg", ("caption", "long"))
    first, no_image, no_caption, plain = (source[i] for i in range(4))
    assert first["captions"] == ["a", "a long one", "another"] and first["image"] == image
    assert no_image["image"] == b"" and no_image["where"].endswith("00000.parquet:1 (no image)")
    assert no_caption["image"] == b"" and no_caption["where"].endswith(":2 (no caption)")
    assert plain == {"image": image, "caption": "c", "where": f"{tmp_path}/00000.parquet:3"}
    skipped = data.Skipped()
    decoded = [data.decode(source[i], 16, skipped) for i in range(4)]
    assert [d["valid"] for d in decoded] == [True, False, False, True] and skipped.count == 2

    with pytest.raises(ValueError, match=r"00000\.parquet: no column 'text' .*data\.image_column"):
        ParquetSource([tmp_path / "00000.parquet"], "jpg", ("text",))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: not a parquet file"):
        data.open_source("parquet", str(tmp_path / "bad.parquet"))


def test_the_tiny_run_trains_from_parquet_shards_in_a_bucket(uninterrupted, buckets, tmp_path):
    """Shards written in the manifest's order give the manifest run's global batches: the
    first logged losses are the uninterrupted run's. (WebDataset shards: the S3 training test
    of test_train.)"""
    out = f"{buckets('gs')}/shards"
    arguments = ["--path", str(MANIFEST), "--out", out, "--format", "parquet", "--per-shard", "10"]
    assert shards.main(arguments) == 0
    assert len(storage.glob(f"{out}/*.parquet")) == 4
    config = tiny_config(**{**SHORT, "total_steps": 4})
    config.data.update(source="parquet", path=out)
    train(config, tmp_path / "run")
    for a, b in zip(read_metrics(tmp_path / "run"), read_metrics(uninterrupted)[:2], strict=True):
        assert relative_error(a["loss"], b["loss"]) < 1e-6, a["step"]


def test_shards_command_names_a_bad_source(tmp_path, capsys):
    missing = str(tmp_path / "nothing.jsonl")
    out = str(tmp_path / "out")
    assert shards.main(["--path", missing, "--out", out, "--format", "parquet"]) == 2
    assert capsys.readouterr().err.startswith("error: [Errno 2] No such file or directory")


def hide_pyarrow(monkeypatch) -> None:
    """As if pyarrow were not installed: `import pyarrow` raises ImportError."""
    for name in ("pyarrow", "pyarrow.parquet"):
        monkeypatch.setitem(sys.modules, name, None)


def test_parquet_without_pyarrow_is_one_error_line(tmp_path, monkeypatch, capsys):
    """Said before anything is read (the --path does not exist) or written (no --out)."""
    hide_pyarrow(monkeypatch)
    out = tmp_path / "out"
    missing = str(tmp_path / "nothing.jsonl")
    assert shards.main(["--path", missing, "--out", str(out), "--format", "parquet"]) == 2
    assert capsys.readouterr().err == (
        "error: --format parquet needs pyarrow: pip install 'ella-jax[parquet]'\n"
    )
    assert not out.exists()


def test_training_from_parquet_without_pyarrow_names_the_extra(tmp_path, monkeypatch):
    pq.write_table(pa.table({"jpg": [b"x"], "caption": ["a"]}), tmp_path / "00000.parquet")
    hide_pyarrow(monkeypatch)
    message = r"^data\.source='parquet' needs pyarrow: pip install 'ella-jax\[parquet\]'$"
    with pytest.raises(ValueError, match=message):
        data.open_source("parquet", str(tmp_path))


def names(folder: str) -> list[str]:
    """The names in a local folder or a bucket's folder."""
    return sorted(entry.name for entry in storage.path(folder).iterdir())


@pytest.mark.parametrize("where", ["local", "gs", "s3"])
def test_overwrite_replaces_the_shards_whole(where, request, tmp_path, capsys):
    """An --out that holds files is refused without --overwrite; with it, the folder holds the
    new shards alone afterwards (the earlier ones of higher numbers, another format's and their
    index caches removed), and a file that is not a shard is refused, named, before anything
    is written."""
    out = str(tmp_path / "shards")
    if where != "local":
        out = f"{request.getfixturevalue('buckets')(where)}/shards"
    arguments = ["--path", str(MANIFEST), "--out", out, "--format", "webdataset"]
    assert shards.main([*arguments, "--per-shard", "5"]) == 0
    assert len(data.open_source("webdataset", out)) == 32  # and caches the 7 shards' indexes
    earlier = [f"0000{i}.tar{suffix}" for i in range(7) for suffix in ("", ".index.json")]
    assert names(out) == earlier
    capsys.readouterr()

    assert shards.main([*arguments, "--per-shard", "12"]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {out}: not empty (pass --overwrite to replace the shards in it)\n"
    )
    assert names(out) == earlier

    assert shards.main([*arguments, "--per-shard", "12", "--overwrite"]) == 0
    assert names(out) == ["00000.tar", "00001.tar", "00002.tar"]
    assert len(data.open_source("webdataset", out)) == 32
    arguments[-1] = "parquet"
    assert shards.main([*arguments, "--per-shard", "16", "--overwrite"]) == 0
    assert names(out) == ["00000.parquet", "00001.parquet"]
    assert len(data.open_source("parquet", out)) == 32

    storage.path(f"{out}/notes.txt").write_text("mine")
    capsys.readouterr()
    assert shards.main([*arguments, "--per-shard", "5", "--overwrite"]) == 2
    assert capsys.readouterr().err == (
        f"error: --out {out}: holds {out}/notes.txt, which is not a shard of this command "
        "(--overwrite replaces shards only)\n"
    )
    assert names(out) == ["00000.parquet", "00001.parquet", "notes.txt"]


def test_out_that_overlaps_the_input_is_refused(tmp_path, capsys):
    """An --out that is the input, holds it or lies inside it would be written while it is
    read: refused, with --overwrite too, and nothing written."""
    tiny = tmp_path / "tiny"
    shutil.copytree(MANIFEST.parent, tiny)
    shards.main(["--path", str(tiny / "captions.jsonl"), "--out", str(tiny / "tars"),
                 "--format", "webdataset"])  # fmt: skip
    before = sorted(tiny.rglob("*"))
    capsys.readouterr()
    for source, path, out in [
        ("manifest", tiny / "captions.jsonl", tiny),
        ("webdataset", tiny / "tars", tiny / "tars"),
        ("webdataset", tiny / "tars", tiny / "tars" / "again"),
        ("webdataset", tiny / "tars" / "*.tar", tiny / "tars"),
    ]:
        arguments = ["--source", source, "--path", str(path), "--out", str(out)]
        assert shards.main([*arguments, "--format", "webdataset", "--overwrite"]) == 2
        assert capsys.readouterr().err == (
            f"error: --out {out} overlaps the input --path {path}: write the shards elsewhere\n"
        )
    assert sorted(tiny.rglob("*")) == before
