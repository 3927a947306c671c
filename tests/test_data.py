"""The training data pipeline: sources, unreadable images, per-process slices of global batches."""

import json
import shutil

import msgpack
import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from ella_jax.train import data

TINY = ROOT / "data" / "tiny"


def fake_tokenize(caption):
    ids = np.zeros(8, np.int32)
    ids[: min(len(caption), 8)] = [ord(c) for c in caption[:8]]
    return ids, ids > 0


def batches(source, count, global_batch=8, process_index=0, process_count=1, dropout=0.0):
    prepare = data.online_examples(fake_tokenize, resolution=16)
    dataset = data.make_dataset(
        source, prepare, global_batch, dropout, 0, process_index, process_count
    )
    return [dataset[i] for i in range(count)]


def test_process_slices_reassemble_the_global_batch():
    source = data.read_manifest(TINY / "captions.jsonl")
    whole = batches(source, 3, dropout=0.5)
    parts = [batches(source, 3, process_index=p, process_count=2, dropout=0.5) for p in (0, 1)]
    for step in range(3):
        for key in whole[step]:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])


def test_epochs_are_reshuffled_and_cover_every_example():
    source = data.read_manifest(TINY / "captions.jsonl")
    first, second = [
        np.concatenate([b["image"] for b in batches(source, 8)[i : i + 4]]) for i in (0, 4)
    ]
    as_set = lambda images: sorted(map(bytes, images.reshape(32, -1).view(np.uint8)))  # noqa: E731
    assert as_set(first) == as_set(second) and not np.array_equal(first, second)


def test_unreadable_image_is_masked_not_fatal(tmp_path):
    shutil.copytree(TINY, tmp_path / "tiny")
    (tmp_path / "tiny" / "images" / "03.png").write_bytes(b"not a png")
    source = data.read_manifest(tmp_path / "tiny" / "captions.jsonl")
    found = [b for b in batches(source, 4) if not b["valid"].all()]
    assert len(found) == 1
    invalid = ~found[0]["valid"]
    assert invalid.sum() == 1 and not found[0]["image"][invalid].any()


def test_resize_and_centre_crop(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a red rectangle\n")
    [record] = data.read_folder(tmp_path)
    example = data.decode(record, 16)
    assert example["valid"] and example["image"].shape == (16, 16, 3)
    assert example["caption"] == "a red rectangle"
    np.testing.assert_allclose(example["image"][..., 0], 1.0)


def test_array_record_shards_give_the_manifest_examples(tmp_path):
    records = data.read_manifest(TINY / "captions.jsonl")
    data.write_array_record(records[:20], tmp_path / "a.array_record")
    data.write_array_record(records[20:], tmp_path / "b.array_record")
    shards = data.open_source("array_record", str(tmp_path / "*.array_record"))
    assert len(shards) == 32
    for a, b in zip(batches(shards, 2), batches(records, 2), strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_bad_manifest_line_is_named(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "x.png", "caption": "c"}) + "\n{not json}\n")
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not a"):
        data.read_manifest(manifest)
    with pytest.raises(ValueError, match="no ArrayRecord shards"):
        data.open_source("array_record", str(tmp_path / "*.array_record"))


def test_only_unreadable_images_are_skipped_and_they_are_remembered(tmp_path):
    """A missing or corrupt image is skipped and remembered; a record that is no image-caption
    record at all (the wrong kind of shard) is an error, not a skipped image."""
    (tmp_path / "bad.png").write_bytes(b"not a png")
    skipped = data.Skipped(keep=1)
    for image in (str(tmp_path / "absent.png"), str(tmp_path / "bad.png")):
        example = data.decode({"image": image, "caption": "c"}, 16, skipped)
        assert not example["valid"] and not example["image"].any()
    assert skipped.count == 2 and "absent.png (FileNotFoundError" in skipped.describe()
    precomputed = msgpack.packb(data.pack_arrays({"latent_mean": np.zeros(4), "caption": "c"}))
    with pytest.raises(ValueError, match=r"not an image-caption record \(found \['caption', "):
        data.decode(precomputed, 16)
    prepare = data.precomputed_examples({})
    with pytest.raises(ValueError, match=r"not a train\.precompute record"):
        prepare(msgpack.packb({"image": b"png", "caption": "c"}), False)
