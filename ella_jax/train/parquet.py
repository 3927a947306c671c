"""Parquet files of image-caption rows, as img2dataset writes them, as a random-access source.

A row holds the encoded image in one column (img2dataset: "jpg") and its caption in others
("caption"; a column may also hold a list of captions). Parquet stores rows in row groups and
reads a row group at once, so the index needs no cache: it is the row groups' sizes, in each
file's footer. Reading an example reads its row group's image and caption columns (the last few
are kept in memory for neighbouring rows): shards want small row groups (img2dataset writes
100 rows; `python -m train.shards` too): 5 ms per random read of 60 kB images (BENCHMARKS.md).
A row without an image or a caption is kept with empty image bytes: the trainer counts it as
skipped.
"""

import bisect
import functools
import os
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from ella_jax import storage

ROW_GROUPS_KEPT = 4  # row groups kept in memory


def import_pyarrow(needed_by: str) -> ModuleType:
    """pyarrow.parquet; without pyarrow, a ValueError saying that `needed_by` (a flag, a config
    key) needs the `parquet` extra."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise ValueError(f"{needed_by} needs pyarrow: pip install 'ella-jax[parquet]'") from None
    return pyarrow.parquet


class ParquetSource:
    """Records {"image": bytes, "caption": str, "where": "FILE:ROW"} (and "captions": [str] when
    there are several) of parquet files, by index over all rows in the order given."""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        image_column: str = "jpg",
        caption_columns: Sequence[str] = ("caption",),
    ):
        pq = import_pyarrow("data.source='parquet'")
        self.files = [str(f) for f in files]
        self.columns = [image_column, *caption_columns]
        self.image_column, self.caption_columns = image_column, tuple(caption_columns)
        self.groups: list[tuple[int, int]] = []  # (file, row group) of each row group
        self.starts = [0]  # the first row of each row group, over all files
        self.file_starts = []  # the first row of each file
        for number, file in enumerate(self.files):
            self.file_starts.append(self.starts[-1])
            try:
                with storage.path(file).open("rb") as stream:
                    metadata = pq.ParquetFile(stream).metadata
            except Exception as e:  # pyarrow raises ArrowInvalid (a ValueError) and OSError
                raise ValueError(f"{file}: not a parquet file ({e})") from None
            names = set(metadata.schema.to_arrow_schema().names)
            missing = [column for column in self.columns if column not in names]
            if missing:
                raise ValueError(
                    f"{file}: no column {', '.join(map(repr, missing))} (it has "
                    f"{', '.join(sorted(names))}): set data.image_column / data.caption_columns"
                )
            for group in range(metadata.num_row_groups):
                self.groups.append((number, group))
                self.starts.append(self.starts[-1] + metadata.row_group(group).num_rows)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        group = bisect.bisect_right(self.starts, index) - 1
        number, row_group = self.groups[group]
        columns = _read_row_group(self.files[number], row_group, tuple(self.columns))
        row = index - self.starts[group]
        where = f"{self.files[number]}:{index - self.file_starts[number]}"
        image = columns[self.image_column][row]
        captions = []
        for column in self.caption_columns:
            value = columns[column][row]
            values = value if isinstance(value, list) else [value]
            captions.extend(v.strip() for v in values if isinstance(v, str) and v.strip())
        if not isinstance(image, bytes) or not image:
            where += " (no image)"
            image = b""
        if not captions:  # skipped as an unreadable image
            return {"image": b"", "caption": "", "where": where + " (no caption)"}
        record = {"image": image, "caption": captions[0], "where": where}
        return {**record, "captions": captions} if len(captions) > 1 else record


@functools.lru_cache(maxsize=ROW_GROUPS_KEPT)  # shared by grain's reading threads
def _read_row_group(file: str, group: int, columns: tuple[str, ...]) -> dict[str, list]:
    import pyarrow.parquet as pq

    with storage.path(file).open("rb") as stream:
        table = pq.ParquetFile(stream).read_row_group(group, columns=list(columns))
    return {column: table.column(column).to_pylist() for column in columns}
