"""python -m train.shards --source manifest --path data/tiny/captions.jsonl --out DIR --format F

Writes image-caption records (any `train.data` source) as shards in img2dataset's layouts, to a
local folder or a gs:// or s3:// URI: `webdataset` (00000.tar, ... of KEY.EXT + KEY.txt +
KEY.json) or `parquet` (00000.parquet, ... with the columns key, jpg, caption, row groups of
--row-group rows). The images are stored as they are (their bytes, whatever the format; the
column is named "jpg" as img2dataset names it). Each shard is written whole or not at all.
Train from them with `--config.data.source=webdataset|parquet --config.data.path=OUT`.
"""

import argparse
import io
import json
import os
import sys
import tarfile
from collections.abc import Sequence

from tqdm import tqdm

from ella_jax import storage
from ella_jax.storage import atomic_path
from ella_jax.train import data


def _image(record: dict) -> tuple[bytes, str]:
    """(encoded bytes, extension) of a record's image."""
    image = record["image"]
    if isinstance(image, bytes):
        return image, "jpg"
    extension = os.path.splitext(image)[1].lstrip(".").lower() or "jpg"
    return storage.path(image).read_bytes(), extension


def _chunks(records: Sequence, per_shard: int):
    """(shard number, first index, the shard's records), one shard in memory at a time."""
    for number, start in enumerate(tqdm(range(0, len(records), per_shard), desc="shards")):
        end = min(start + per_shard, len(records))
        yield number, start, [records[i] for i in range(start, end)]


def write_webdataset(records: Sequence, out: str, per_shard: int) -> list[str]:
    """Writes `records` (a `train.data` source) as WebDataset shards; returns their paths."""
    written = []
    for number, start, chunk in _chunks(records, per_shard):
        shard = f"{out.rstrip('/')}/{number:05d}.tar"
        with atomic_path(shard, overwrite=True) as staging, tarfile.open(staging, "w") as archive:
            for index, record in enumerate(chunk, start=start):
                key = f"{index:09d}"
                image, extension = _image(record)
                captions = record.get("captions") or [record["caption"]]
                members = {
                    f"{key}.{extension}": image,
                    f"{key}.txt": captions[0].encode(),
                    f"{key}.json": json.dumps({"key": key, "captions": captions}).encode(),
                }
                for name, payload in members.items():
                    member = tarfile.TarInfo(name)
                    member.size = len(payload)
                    archive.addfile(member, io.BytesIO(payload))
        written.append(shard)
    return written


def write_parquet(records: Sequence, out: str, per_shard: int, row_group: int) -> list[str]:
    """Writes `records` (a `train.data` source) as parquet shards; returns their paths."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    written = []
    for number, start, chunk in _chunks(records, per_shard):
        table = pa.table(
            {
                "key": [f"{i:09d}" for i in range(start, start + len(chunk))],
                "jpg": [_image(record)[0] for record in chunk],
                "caption": [record["caption"] for record in chunk],
            }
        )
        shard = f"{out.rstrip('/')}/{number:05d}.parquet"
        with atomic_path(shard, overwrite=True) as staging:
            pq.write_table(table, staging, row_group_size=row_group)
        written.append(shard)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.shards",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--source",
        default="manifest",
        choices=["manifest", "folder", "webdataset", "parquet", "array_record"],
        help="what --path holds (as config.data.source)",
    )
    parser.add_argument("--path", required=True, help="its data.path (local or a URI)")
    parser.add_argument("--out", required=True, help="folder or gs:// / s3:// URI to write to")
    parser.add_argument("--format", choices=["webdataset", "parquet"], required=True)
    parser.add_argument("--per-shard", type=int, default=10000, help="examples per shard")
    parser.add_argument(
        "--row-group", type=int, default=100, help="parquet rows per row group (img2dataset's)"
    )
    args = parser.parse_args(argv)
    if args.per_shard <= 0 or args.row_group <= 0:
        parser.error("--per-shard and --row-group must be positive")
    try:
        records = data.open_source(args.source, args.path)
        storage.reachable(args.out)
        if args.format == "webdataset":
            written = write_webdataset(records, args.out, args.per_shard)
        else:
            written = write_parquet(records, args.out, args.per_shard, args.row_group)
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {len(records)} examples in {len(written)} {args.format} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
