"""python -m bench.data_sources [--examples 4096] [--image-size 256]

What random access costs per data source, on local disk: the toy world's scenes (PNG) written as
one shard of each kind (`train.shards` for WebDataset and parquet, `train.data.write_array_record`
for ArrayRecord), then the median time of opening the source (for WebDataset: building the tar
index, then reading it from its cache) and of reading one record at a random index (grain's
global shuffle), without decoding. Buckets add a request per read (per member for WebDataset).
"""

import argparse
import os
import random
import tempfile
import time

from bench.timing import median_seconds
from toyworld.scenes import write_folder
from train import data, shards
from train.webdataset import INDEX_SUFFIX


def _random_reads(source, count: int = 200) -> float:
    """Median seconds of one read at a random index."""
    rng = random.Random(0)
    indices = [rng.randrange(len(source)) for _ in range(count)]
    times = []
    for index in indices:
        start = time.perf_counter()
        source[index]
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data_sources", description=__doc__)
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--image-size", type=int, default=256, help="scene size in pixels")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        manifest = write_folder(os.path.join(folder, "scenes"), 0, args.examples, args.image_size)
        records = data.read_manifest(manifest)
        out = os.path.join(folder, "shards")
        per_shard = ["--per-shard", str(args.examples)]
        for kind in ("webdataset", "parquet"):
            shards.main(["--path", str(manifest), "--out", f"{out}/{kind}",
                         "--format", kind, *per_shard])  # fmt: skip
        data.write_array_record(records, f"{out}/array_record/00000.array_record")
        megabytes = os.path.getsize(f"{out}/webdataset/00000.tar") / 1e6
        print(f"{args.examples} scenes of {args.image_size} px, a {megabytes:.0f} MB shard each")
        print("| source | open (s) | random read (ms) |")
        print("| --- | --- | --- |")
        tar = f"{out}/webdataset/00000.tar"
        start = time.perf_counter()
        data.open_source("webdataset", tar)
        build = time.perf_counter() - start
        print(f"| webdataset, index built | {build:.3f} | |")
        for kind, row in (("webdataset", "index cached"), ("parquet", "row groups of 256"),
                          ("array_record", "")):  # fmt: skip
            path = f"{out}/{kind}"
            opened = median_seconds(lambda k=kind, p=path: data.open_source(k, p), 3)
            source = data.open_source(kind, path)
            read = _random_reads(source) * 1e3
            print(f"| {kind}{', ' + row if row else ''} | {opened:.3f} | {read:.3f} |")
        assert os.path.exists(tar + INDEX_SUFFIX)


if __name__ == "__main__":
    main()
