"""Parquet files (train.parquet) and the shards `python -m train.shards` writes: the same batches
as the manifest they were made from, missing values skipped and counted, bad files named; the
tiny run trained from parquet shards of data/tiny in a bucket."""

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
    assert shards.main(["--path", missing, "--out", str(tmp_path), "--format", "parquet"]) == 2
    assert capsys.readouterr().err.startswith("error: [Errno 2] No such file or directory")
