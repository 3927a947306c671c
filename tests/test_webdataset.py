"""WebDataset tar shards (train.webdataset): the same batches as the manifest they were made
from, the per-shard index cached and rebuilt, missing and corrupt members skipped and counted,
several captions drawn per example."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from test_data import fake_tokenize

from ella_jax.train import data
from ella_jax.train.shards import write_webdataset
from ella_jax.train.webdataset import INDEX_SUFFIX, WebDatasetSource, build_index

TINY = ROOT / "data" / "tiny"


def batches(source, count, skipped=None, seed=0):
    prepare = data.online_examples(fake_tokenize, resolution=16, skipped=skipped)
    dataset = data.make_dataset(source, prepare, 8, 0.0, seed)
    return [dataset[i] for i in range(count)]


def add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    archive.addfile(member, io.BytesIO(payload))


def write_shards(folder: Path, records: list[dict], per_shard: int, extra=None) -> list[Path]:
    """img2dataset's layout: shards 00000.tar, ... of KEY.png, KEY.txt, KEY.json."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for start in range(0, len(records), per_shard):
        path = folder / f"{start // per_shard:05d}.tar"
        with tarfile.open(path, "w") as archive:
            for number, record in enumerate(records[start : start + per_shard], start=start):
                key = f"{number:09d}"
                add(archive, f"{key}.png", Path(record["image"]).read_bytes())
                add(archive, f"{key}.txt", record["caption"].encode())
                metadata = {"key": key, **(extra(record) if extra else {})}
                add(archive, f"{key}.json", json.dumps(metadata).encode())
        paths.append(path)
    return paths


def test_shards_give_the_batches_of_their_manifest(tmp_path):
    """The shards of data/tiny hold its records in the same order: the same examples at the
    same indices, so the same shuffled batches, images and captions."""
    records = data.read_manifest(TINY / "captions.jsonl")
    write_shards(tmp_path, records, per_shard=10)
    source = data.open_source("webdataset", str(tmp_path))
    assert len(source) == len(records) and len(source.shards) == 4
    for got, expected in zip(batches(source, 3), batches(records, 3), strict=True):
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)
    assert data.open_source("webdataset", str(tmp_path / "0000[01].tar")).shards == [
        str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]  # fmt: skip


def test_the_index_is_cached_and_rebuilt_when_the_shard_changes(tmp_path):
    records = data.read_manifest(TINY / "captions.jsonl")
    (shard,) = write_shards(tmp_path, records[:4], per_shard=4)
    index = shard.with_name(shard.name + INDEX_SUFFIX)
    WebDatasetSource([shard])
    written = index.stat().st_mtime_ns
    assert len(WebDatasetSource([shard])) == 4 and index.stat().st_mtime_ns == written
    write_shards(tmp_path, records[:6], per_shard=6)  # the same name, other contents
    assert len(WebDatasetSource([shard])) == 6


def test_missing_and_corrupt_members_are_skipped_and_counted(tmp_path, capsys):
    """A cut image, a key without an image, a key without a caption, and a shard cut short
    inside a member: every readable example is read, the others counted with where they
    were; a file that is not a tar is an error naming it."""
    records = data.read_manifest(TINY / "captions.jsonl")[:4]
    shard = tmp_path / "00000.tar"
    with tarfile.open(shard, "w") as archive:
        for number, record in enumerate(records):
            image = Path(record["image"]).read_bytes()
            add(archive, f"{number}.png", image[: len(image) // 3] if number == 1 else image)
            add(archive, f"{number}.txt", record["caption"].encode())
        add(archive, "4.txt", b"a caption without an image")
        add(archive, "5.png", Path(records[0]["image"]).read_bytes())
    cut = tmp_path / "cut" / "00000.tar"
    cut.parent.mkdir()
    source = WebDatasetSource([shard])
    offset, _ = dict(source.indexes[0])["2"]["png"]
    cut.write_bytes(shard.read_bytes()[: offset + 10])  # inside the third image
    assert len(source) == 6
    skipped = data.Skipped(keep=10)
    decoded = [data.decode(source[i], 16, skipped) for i in range(6)]
    assert [d["valid"] for d in decoded] == [True, False, True, True, False, False]
    assert skipped.count == 3
    assert f"{shard}:1 (" in skipped.examples[0]
    assert f"{shard}:4 (no image member)" in skipped.examples[1]
    assert f"{shard}:5 (no caption)" in skipped.examples[2]
    assert len(WebDatasetSource([cut])) == 3  # the cut image's read comes short: skipped
    assert f"warning: {cut}: cut short after" in capsys.readouterr().err
    (tmp_path / "x.tar").write_text("not a tar")
    with pytest.raises(ValueError, match=r"x.tar: not a tar shard"):
        WebDatasetSource([tmp_path / "x.tar"])


def test_several_captions_are_drawn_per_example_and_step(tmp_path):
    """captions=("txt", "json:long_caption"): each example gives one of its two captions,
    drawn by its global index (both appear, the same on a rerun; `caption_weights` choose);
    train.precompute's decode keeps the first."""
    records = data.read_manifest(TINY / "captions.jsonl")[:8]
    write_shards(tmp_path, records, 8, extra=lambda r: {"long_caption": "LONG " + r["caption"]})
    source = data.open_source("webdataset", str(tmp_path), ("txt", "json:long_caption"))
    assert source[0]["captions"] == [records[0]["caption"], "LONG " + records[0]["caption"]]
    assert data.decode(source[0], 16)["caption"] == records[0]["caption"]
    prepare = lambda record, drop: record["caption"]  # noqa: E731
    dataset = data.make_dataset(source, prepare, 8, 0.0, seed=0)
    drawn = [list(dataset[step]) for step in range(4)]
    long = sum(caption.startswith("LONG ") for batch in drawn for caption in batch)
    assert 0 < long < 32
    again = data.make_dataset(source, prepare, 8, 0.0, seed=0)
    assert drawn == [list(again[step]) for step in range(4)]
    for weights, expected in (((0, 1), 8), ((1, 0), 0)):  # data.caption_weights
        weighted = data.make_dataset(source, prepare, 8, 0.0, 0, caption_weights=weights)
        assert sum(caption.startswith("LONG ") for caption in weighted[0]) == expected
    with pytest.raises(ValueError, match=r"data\.caption_weights=\(0, 0\): use weights >= 0"):
        data.make_dataset(source, prepare, 8, 0.0, 0, caption_weights=(0, 0))
    with pytest.raises(ValueError, match=r"data\.captions: 'caption' is neither"):
        data.open_source("webdataset", str(tmp_path), ("caption",))


@pytest.mark.parametrize(
    "cut, kept",
    [
        ("inside the 21st member's header", 7),  # 6 examples of 3 members, and 2 of the 7th's
        ("at the 31st member, without the end blocks", 10),
        ("inside the 51st member's data", 17),
        ("not at all", 40),
    ],
)
def test_a_shard_cut_short_is_reported_with_the_examples_kept(tmp_path, capsys, cut, kept):
    """Python's tarfile stops without a word at a cut header or a missing end-of-archive
    marker: every cut is said, with the examples kept; an intact shard is not."""
    records = [{"image": b"image %d " % i * 50, "caption": f"caption {i}"} for i in range(40)]
    (whole,) = write_webdataset(records, str(tmp_path / "whole"), per_shard=40)
    with tarfile.open(whole) as archive:
        members = archive.getmembers()
    assert len(members) == 120  # KEY.jpg, KEY.txt, KEY.json
    end = {
        "inside the 21st member's header": members[20].offset + 100,
        "at the 31st member, without the end blocks": members[30].offset,
        "inside the 51st member's data": members[50].offset_data + 10,
        "not at all": None,
    }[cut]
    shard = tmp_path / "00000.tar"
    shard.write_bytes(Path(whole).read_bytes()[:end])
    capsys.readouterr()  # the writer's progress bar
    index = build_index(shard)
    assert len(index) == kept
    err = capsys.readouterr().err
    if end is None:
        assert err == ""
    else:
        assert err.startswith(f"warning: {shard}: cut short after {kept} examples (") and (
            err.count("\n") == 1
        ), err
