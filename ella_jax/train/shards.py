"""python -m train.shards --source manifest --path data/tiny/captions.jsonl --out DIR --format F

Writes image-caption records (any `train.data` source) as shards in img2dataset's layouts, to a
local folder or a gs:// or s3:// URI: `webdataset` (00000.tar, ... of KEY.EXT + KEY.txt +
KEY.json) or `parquet` (00000.parquet, ... with the columns key, jpg, caption, row groups of
--row-group rows). The images are stored as they are (their bytes, whatever the format; the
column is named "jpg" as img2dataset names it). Each shard is written whole or not at all.
Train from them with `--config.data.source=webdataset|parquet --config.data.path=OUT`.

An OUT that holds files is refused unless --overwrite: then, once every new shard is written,
the earlier shards that remain (higher numbers, the other format, index caches) are removed, so
OUT holds the new shards alone. OUT must hold nothing but this command's shards (it never
deletes another file), and must not be, hold or lie inside the input --path.
"""

import argparse
import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Sequence

from etils import epath
from tqdm import tqdm

from ella_jax import storage
from ella_jax.storage import atomic_path
from ella_jax.train import data
from ella_jax.train.parquet import import_pyarrow
from ella_jax.train.webdataset import INDEX_SUFFIX

# The files this command writes in OUT: shards, and the index caches training adds beside tars.
SHARD_FILE = re.compile(rf"\d{{5,}}\.(tar({re.escape(INDEX_SUFFIX)})?|parquet)")


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


def input_folder(location: str) -> str:
    """Where --path reads from: the path itself, or for a glob pattern its folder before the
    first component with a wildcard."""
    parts = location.split("/")
    for number, part in enumerate(parts):
        if any(wildcard in part for wildcard in "*?["):
            return "/".join(parts[:number]) or "."
    return location


def earlier_files(out: epath.Path, overwrite: bool) -> list[epath.Path]:
    """The files in `out` that new shards are to replace (none where it is absent or empty).
    Refused (a ValueError): an `out` that holds files without `overwrite`, and one that holds
    anything but this command's shards (`atomic_path`'s staging folders aside)."""
    if out.is_file():
        raise ValueError(f"--out {out}: a file, not a folder")
    entries = sorted(out.iterdir(), key=lambda entry: entry.name) if out.is_dir() else []
    entries = [entry for entry in entries if not storage.is_staging(entry.name)]
    if entries and not overwrite:
        raise ValueError(f"--out {out}: not empty (pass --overwrite to replace the shards in it)")
    foreign = [entry for entry in entries if not SHARD_FILE.fullmatch(entry.name)]
    if foreign:
        raise ValueError(
            f"--out {out}: holds {foreign[0]}, which is not a shard of this command "
            "(--overwrite replaces shards only)"
        )
    return entries


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
    parser.add_argument(
        "--path", type=storage.path_argument, required=True, help="its data.path (local or a URI)"
    )
    parser.add_argument(
        "--out",
        type=storage.path_argument,
        required=True,
        help="folder or gs:// / s3:// URI to write to",
    )
    parser.add_argument("--format", choices=["webdataset", "parquet"], required=True)
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the shards an earlier run left in --out"
    )
    parser.add_argument("--per-shard", type=int, default=10000, help="examples per shard")
    parser.add_argument(
        "--row-group", type=int, default=100, help="parquet rows per row group (img2dataset's)"
    )
    args = parser.parse_args(argv)
    if args.per_shard <= 0 or args.row_group <= 0:
        parser.error("--per-shard and --row-group must be positive")
    source, out = os.fspath(args.path), os.fspath(args.out)
    try:
        if args.format == "parquet":
            import_pyarrow("--format parquet")  # before anything is read or written
        storage.reachable(source)
        destination = storage.reachable(out)
        if storage.overlap(destination, input_folder(source)):
            raise ValueError(
                f"--out {out} overlaps the input --path {source}: write the shards elsewhere"
            )
        earlier = earlier_files(destination, args.overwrite)
        records = data.open_source(args.source, source)
        if args.format == "webdataset":
            written = write_webdataset(records, out, args.per_shard)
        else:
            written = write_parquet(records, out, args.per_shard, args.row_group)
        new = {os.path.basename(shard) for shard in written}
        stale = [entry for entry in earlier if entry.name not in new]
        for entry in stale:
            entry.unlink()
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    removed = f" (removed {len(stale)} earlier files)" if stale else ""
    print(f"wrote {len(records)} examples in {len(written)} {args.format} shards to {out}{removed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
