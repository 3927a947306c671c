"""The path layer (ella_jax.storage) against fake-gcs-server and moto's S3 server: outputs whole
or not at all, globs, checkpoints, tokenizers and WebDataset shards read from a bucket, and a URI
that cannot be opened named in one error. (Training in buckets: test_train, test_multihost,
test_shards.)"""

import asyncio
import socket
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REFERENCE, ROOT, tiny_config, upload
from test_webdataset import batches, write_shards

from ella_jax import load_ella, storage
from ella_jax.text import load_tokenizer, tokenize
from ella_jax.train import data, shards
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


def closed_port() -> int:
    """A loopback port that nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_an_unreachable_endpoint_is_one_line_in_seconds(scheme, monkeypatch, tmp_path, capsys):
    """An emulator that does not answer (a closed port; a name that never resolves): one line
    naming the URI and the endpoint, in seconds (gcsfs and s3fs would retry for 14-84 s, gcsfs
    printing each request's traceback)."""
    if scheme == "gs":
        endpoint = f"http://127.0.0.1:{closed_port()}"
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)
    else:
        endpoint = "http://nonexistent.invalid"  # the .invalid top-level domain never resolves
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    uri = f"{scheme}://bucket/captions.jsonl"
    start = time.perf_counter()
    assert shards.main(["--path", uri, "--out", str(tmp_path), "--format", "webdataset"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {uri}: cannot reach {endpoint} (") and err.count("\n") == 1
    with pytest.raises(storage.StorageError, match=rf"^{scheme}://bucket/run: cannot reach "):
        train(tiny_config(), f"{scheme}://bucket/run")
    with pytest.raises(storage.StorageError, match=rf"^{scheme}://bucket/\*\.tar: cannot reach "):
        storage.glob(f"{scheme}://bucket/*.tar")
    assert time.perf_counter() - start < 10


def test_gcsfs_prints_no_traceback_of_a_request_it_gives_up(caplog):
    """The error reaches the caller, which names it in one line."""
    import aiohttp
    from gcsfs.retry import retry_request

    async def refused():
        raise aiohttp.ClientError("connection refused")

    with pytest.raises(aiohttp.ClientError):
        asyncio.run(retry_request(retries=1)(refused)())
    assert caplog.records == []


def test_a_path_argument_without_its_client_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # as if it were not installed
    with pytest.raises(SystemExit) as exit_:
        shards.main(["--path", "gs://bucket/x.jsonl", "--out", "out", "--format", "parquet"])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == (
        "python -m train.shards: error: argument --path: gs://bucket/x.jsonl: gs:// paths need "
        "gcsfs: pip install 'ella-jax[cloud]'"
    )
