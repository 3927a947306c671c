"""python -m bench.data_sources [--examples 2048] [--image-kb 60]

What random access costs per data source, on local disk: records of random bytes the size of a
LAION JPEG at 512 px (about 60 kB) and a caption, written as one shard of each kind
(`train.shards` for WebDataset and parquet, with img2dataset's parquet row groups of 100 rows;
`train.data.write_array_record` for ArrayRecord), then the time of opening the source (for
WebDataset: building the tar index, then reading it from its cache) and the median time of
reading one record at a random index (grain's global shuffle), without decoding. A bucket adds
a request per read (per member for WebDataset).
"""

import argparse
import os
import random
import tempfile
import time

import numpy as np

from bench.timing import median_seconds
from ella_jax.train import data, shards
from ella_jax.train.webdataset import INDEX_SUFFIX


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
    parser.add_argument("--examples", type=int, default=2048)
    parser.add_argument("--image-kb", type=int, default=60, help="bytes per image / 1000")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rng = np.random.default_rng(0)
        records = [
            {"image": rng.bytes(args.image_kb * 1000), "caption": f"caption {i}"}
            for i in range(args.examples)
        ]
        out = os.path.join(folder, "shards")
        shards.write_webdataset(records, f"{out}/webdataset", args.examples)
        shards.write_parquet(records, f"{out}/parquet", args.examples, row_group=100)
        data.write_array_record(records, f"{out}/array_record/00000.array_record")
        megabytes = os.path.getsize(f"{out}/webdataset/00000.tar") / 1e6
        print(f"{args.examples} records of {args.image_kb} kB, one {megabytes:.0f} MB shard each")
        print("| source | open (s) | random read (ms) |")
        print("| --- | --- | --- |")
        tar = f"{out}/webdataset/00000.tar"
        start = time.perf_counter()
        data.open_source("webdataset", tar)
        build = time.perf_counter() - start
        print(f"| webdataset, index built | {build:.3f} | |")
        for kind, row in (("webdataset", "index cached"), ("parquet", "row groups of 100"),
                          ("array_record", "")):  # fmt: skip
            path = f"{out}/{kind}"
            opened = median_seconds(lambda k=kind, p=path: data.open_source(k, p), 3)
            source = data.open_source(kind, path)
            read = _random_reads(source) * 1e3
            print(f"| {kind}{', ' + row if row else ''} | {opened:.3f} | {read:.3f} |")
        assert os.path.exists(tar + INDEX_SUFFIX)


if __name__ == "__main__":
    main()
