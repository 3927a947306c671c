"""WebDataset tar shards, as img2dataset writes them, as a random-access source for grain.

A shard holds examples as members named KEY.EXT (KEY.jpg and KEY.txt, optionally KEY.json with
more captions). Grain reads examples by index, in any order, on several threads: each shard's
members are located once (their byte offsets, from the tar headers; by process 0 alone in a
multi-process run) and the index is cached beside the shard (00000.tar.index.json beside
00000.tar), rebuilt when the shard changes. A
record is then one seek and one read per member. An example without an image or without a
caption is kept, with empty image bytes: decoding fails, and the trainer counts it as skipped
(never a crash).

Captions: `captions` names where they come from, in order: "txt" (the KEY.txt member) or
"json:FIELD" (a string, or a list of strings, under FIELD of KEY.json). A record's "caption" is
the first found; several also give "captions": `train.data.make_dataset` draws one of them per
example and step.
"""

import bisect
import contextlib
import json
import os
import sys
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from tqdm import tqdm

from ella_jax import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_SUFFIX = ".index.json"
INDEX_VERSION = 2
INDEXING_THREADS = 16


def _split(name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member: the name up to the first dot of its last
    component, and the rest."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def build_index(shard: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """[(key, {extension: (offset, size)})] of a tar shard, in the shard's order. A shard cut
    short (inside a member or a header, or without its end-of-archive marker) keeps the examples
    before the cut (said on stderr); a file that is not a tar is a ValueError."""
    examples: dict[str, dict[str, tuple[int, int]]] = {}
    stream = storage.path(shard).open("rb")
    try:
        archive = tarfile.open(fileobj=stream, mode="r:")  # noqa: SIM115 (closed below)
    except (tarfile.TarError, EOFError) as e:
        stream.close()
        raise ValueError(f"{shard}: not a tar shard ({e}): does data.source name the kind of "
                         "data data.path holds?") from None  # fmt: skip
    with stream, archive:
        try:
            for member in archive:
                if member.isfile():
                    key, extension = _split(member.name)
                    examples.setdefault(key, {})[extension] = (member.offset_data, member.size)
            cut = _no_end_marker(stream, archive.offset)
        except (tarfile.TarError, EOFError) as e:
            cut = str(e)
        if cut:
            print(f"warning: {shard}: cut short after {len(examples)} examples ({cut}); the rest "
                  "is not read", file=sys.stderr)  # fmt: skip
    return list(examples.items())


def _no_end_marker(stream: BinaryIO, offset: int) -> str | None:
    """Why what follows the last member at `offset` is not the end-of-archive marker (a zero
    block; every writer writes two), or None when it is. tarfile ends its iteration without a
    word at a header cut short, or at none, so a cut there is only seen here."""
    stream.seek(offset)
    block = stream.read(tarfile.BLOCKSIZE)
    if block == bytes(tarfile.BLOCKSIZE):
        return None
    if not block:
        return f"no end-of-archive marker at byte {offset}"
    return f"no readable tar header at byte {offset}"


def shard_index(shard: str | os.PathLike) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The shard's index, from SHARD.index.json when it was made for this very file
    (`storage.version`), otherwise built and cached there (skipped where the folder is
    read-only)."""
    shard = storage.path(shard)
    stamp = {"version": INDEX_VERSION, "shard": storage.version(shard)}
    cached = shard.with_name(shard.name + INDEX_SUFFIX)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        saved = json.loads(cached.read_text())
        if saved["stamp"] == stamp:
            return [(key, {e: tuple(m) for e, m in members.items()})
                    for key, members in saved["examples"]]  # fmt: skip
    examples = build_index(shard)
    try:
        with storage.atomic_path(cached, overwrite=True) as staging:
            staging.write_text(json.dumps({"stamp": stamp, "examples": examples}))
    except OSError as e:
        print(f"warning: {cached}: index not cached ({e.strerror})", file=sys.stderr)
    return examples


class WebDatasetSource:
    """Records {"image": bytes, "caption": str, "where": "SHARD:KEY"} (and "captions": [str]
    when there are several) of tar shards, by index over all shards in the order given."""

    def __init__(self, shards: Sequence[str | os.PathLike], captions: Sequence[str] = ("txt",)):
        for field in captions:
            if field != "txt" and not field.startswith("json:"):
                raise ValueError(f"data.captions: {field!r} is neither 'txt' nor 'json:FIELD'")
        self.captions = tuple(captions)
        self.shards = [str(s) for s in shards]
        # Threads: indexing a shard in a bucket is mostly waiting for its bytes.
        with ThreadPoolExecutor(INDEXING_THREADS) as pool:
            indexing = pool.map(shard_index, self.shards)
            bar = tqdm(indexing, total=len(self.shards), desc="shard indexes", unit="shard",
                       disable=len(self.shards) < 100, leave=False)  # fmt: skip
            self.indexes = list(bar)
        self.starts = [0]
        for index in self.indexes:
            self.starts.append(self.starts[-1] + len(index))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard = bisect.bisect_right(self.starts, index) - 1
        key, members = self.indexes[shard][index - self.starts[shard]]
        with storage.path(self.shards[shard]).open("rb") as file:

            def read(extension: str) -> bytes | None:
                if extension not in members:
                    return None
                offset, size = members[extension]
                file.seek(offset)
                return file.read(size)

            image = next((b for e in IMAGE_EXTENSIONS if (b := read(e)) is not None), b"")
            captions = self._captions(read)
        where = f"{self.shards[shard]}:{key}"
        if not image:
            where += " (no image member)"
        if not captions:  # skipped as an unreadable image
            return {"image": b"", "caption": "", "where": where + " (no caption)"}
        record = {"image": image, "caption": captions[0], "where": where}
        return {**record, "captions": captions} if len(captions) > 1 else record

    def _captions(self, read) -> list[str]:
        found, metadata = [], None
        for field in self.captions:
            if field == "txt":
                text = read("txt")
                values = [] if text is None else [text.decode("utf-8", "replace").strip()]
            else:
                if metadata is None:
                    with contextlib.suppress(ValueError, TypeError, AttributeError):
                        metadata = json.loads(read("json") or b"{}")
                    metadata = metadata if isinstance(metadata, dict) else {}
                value = metadata.get(field.removeprefix("json:"))
                values = [value] if isinstance(value, str) else value
                values = (
                    [v for v in values if isinstance(v, str)] if isinstance(values, list) else []
                )
            found.extend(v for v in values if v)
        return found
