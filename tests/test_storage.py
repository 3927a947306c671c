"""The path layer (ella_jax.storage) against fake-gcs-server and moto's S3 server: outputs whole
or not at all, globs, checkpoints, tokenizers and WebDataset shards read from a bucket, and a URI
that cannot be opened named in one error. (Training in buckets: test_train, test_multihost,
test_shards.)"""

import jax
import numpy as np
import pytest
from conftest import REFERENCE, ROOT, tiny_config, upload
from test_webdataset import batches, write_shards

from ella_jax import load_ella, storage
from ella_jax.text import load_tokenizer, tokenize
from ella_jax.train import data
from ella_jax.train.trainer import ConfigError, check_config, train


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_outputs_are_whole_or_absent_and_globs_list_them(scheme, buckets):
    bucket = buckets(scheme)
    with storage.atomic_path(f"{bucket}/run/one.txt") as staging:
        staging.write_text("one")
    with storage.atomic_path(f"{bucket}/run/folder") as staging:
        (staging / "sub").mkdir(parents=True)
        (staging / "sub" / "two.txt").write_text("two")
    with pytest.raises(RuntimeError), storage.atomic_path(f"{bucket}/run/failed.txt") as staging:
        staging.write_text("half")
        raise RuntimeError("the writer failed")
    with pytest.raises(FileExistsError, match=r"run/one\.txt: already exists"):
        storage.atomic_path(f"{bucket}/run/one.txt").__enter__()
    assert storage.glob(f"{bucket}/run/*") == [f"{bucket}/run/folder", f"{bucket}/run/one.txt"]
    assert storage.glob(f"{bucket}/run/**/*.txt") == [f"{bucket}/run/folder/sub/two.txt",
                                                       f"{bucket}/run/one.txt"]  # fmt: skip
    assert storage.path(f"{bucket}/run/folder/sub/two.txt").read_text() == "two"


def test_models_and_tokenizers_load_from_a_bucket(buckets):
    bucket = buckets("gs")
    for name in ("ella.safetensors", "ella_config.json", "t5"):  # the heads are in the .json
        upload(REFERENCE / name, f"{bucket}/{name}")
    model, params = load_ella(f"{bucket}/ella.safetensors")
    local_model, local_params = load_ella(REFERENCE / "ella.safetensors")
    assert model == local_model and model.heads == 4
    jax.tree.map(np.testing.assert_array_equal, params, local_params)
    prompts = ["a red cube on a blue sphere", ""]
    remote = tokenize(load_tokenizer(f"{bucket}/t5"), prompts, 16)
    local = tokenize(load_tokenizer(REFERENCE / "t5"), prompts, 16)
    np.testing.assert_array_equal(remote[0], local[0])


def test_webdataset_shards_in_a_bucket_are_indexed_there(buckets, tmp_path):
    records = data.read_manifest(ROOT / "data" / "tiny" / "captions.jsonl")[:12]
    write_shards(tmp_path, records, per_shard=5)
    bucket = buckets("s3")
    upload(tmp_path, f"{bucket}/shards")
    source = data.open_source("webdataset", f"{bucket}/shards")
    assert storage.glob(f"{bucket}/shards/*.index.json") == [
        f"{bucket}/shards/0000{i}.tar.index.json" for i in range(3)
    ]
    for got, expected in zip(batches(source, 2), batches(records, 2), strict=True):
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_a_uri_that_cannot_be_opened_is_named(buckets):
    with pytest.raises(OSError, match=r"^gs://no-such-bucket/run: cannot be opened \(no such"):
        train(tiny_config(), "gs://no-such-bucket/run")
    with pytest.raises(OSError, match=r"^s3://no-such-bucket/tiny: cannot be opened"):
        check_config(tiny_config(data=dict(path="s3://no-such-bucket/tiny")))
    with pytest.raises(OSError, match=r"^hdfs://x/y: only local paths, gs:// and s3://"):
        storage.path("hdfs://x/y")
    with pytest.raises(ConfigError, match=r"config\.sd='gs://.*' is not a model folder"):
        check_config(tiny_config(sd=f"{buckets('gs')}/sd"))
