"""Image-caption training data with grain.

Sources: a JSONL manifest ({"image": path relative to the manifest, "caption": ...}), a folder of
images with same-named .txt captions, ArrayRecord shards of msgpack records
{"image": encoded bytes, "caption": str}, WebDataset tar shards (`train.webdataset`), or the
shards of `train.precompute` (VAE moments and T5 features made once). A record with several
captions ("captions") gives one of them, drawn per example and step (`train.precompute` keeps
the first). Each example is decoded, resized (shorter side) and centre-cropped to the
resolution, its caption dropped with probability p (so guidance works), and tokenized for T5 at
the fixed length. An image that cannot be read or decoded becomes a zero image with `valid`
False: the loss masks it out, the metrics count it, and `Skipped` remembers where it was (the
trainer stops when too many are). A record that is not an image-caption record at all (the wrong
kind of shard) is an error.

Global batches do not depend on how many processes read them: the shuffled, repeated example
sequence is cut into global batches, and process p reads rows [p * L, (p + 1) * L) of each
(L = global batch / process count).
"""

import io
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import msgpack
import numpy as np
from PIL import Image

from ella_jax import storage
from ella_jax.storage import atomic_path
from ella_jax.train.parquet import ParquetSource
from ella_jax.train.webdataset import WebDatasetSource

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
EMPTY_CAPTION_FILE = "empty_caption.npz"  # in a precomputed folder: T5 features of ""


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """Records {"image": absolute path or URI, "caption"} of a JSONL manifest (and "complex":
    the complex caption of a SUR-adapter example, where the line has one)."""
    path = storage.path(path)
    records = []
    for number, line in enumerate(storage.read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            record = {"image": str(path.parent / entry["image"]), "caption": entry["caption"]}
            if "complex" in entry:
                record["complex"] = str(entry["complex"])
            records.append(record)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{path}:{number}: not a {{'image', 'caption'}} JSON object ({e})"
            ) from None
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def read_folder(path: str | os.PathLike) -> list[dict[str, str]]:
    """Records of every image in `path` (recursively) that has a same-named .txt caption."""
    files = set(storage.glob(f"{str(path).rstrip('/')}/**/*"))
    images = [f for f in sorted(files) if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
    records = [
        {"image": image, "caption": storage.read_text(caption).strip()}
        for image in images
        if (caption := os.path.splitext(image)[0] + ".txt") in files
    ]
    if not records:
        raise ValueError(f"{path}: no images with .txt captions")
    return records


def write_array_record(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Writes records {"image": path or encoded bytes, "caption"} (and "complex", where a record
    has it) as one ArrayRecord shard, whole or not at all (an existing `path` is replaced)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    with atomic_path(path, overwrite=True) as staging:
        writer = ArrayRecordWriter(str(staging), "group_size:1")
        for record in records:
            image = record["image"]
            data = image if isinstance(image, bytes) else storage.path(image).read_bytes()
            fields = {k: record[k] for k in ("caption", "complex") if k in record}
            writer.write(msgpack.packb({"image": data, **fields}))
        writer.close()


SHARD_SUFFIXES = {  # the shard sources, and their files' suffix in a folder
    "array_record": ".array_record",
    "webdataset": ".tar",
    "parquet": ".parquet",
    "precomputed": ".array_record",
}


def open_source(
    kind: str,
    path: str,
    captions: tuple[str, ...] = ("txt",),
    image_column: str = "jpg",
    caption_columns: tuple[str, ...] = ("caption",),
) -> Any:
    """A random-access source of records: kind "manifest", "folder", "array_record" (a glob of
    shards, or their folder), "webdataset" (tar shards, the same; `captions` says where their
    captions are, see `train.webdataset`), "parquet" (parquet files, the same; `image_column`
    and `caption_columns` name their columns, see `train.parquet`) or "precomputed" (a
    `train.precompute` folder). Paths may be gs:// or s3:// URIs."""
    if kind == "manifest":
        return read_manifest(path)
    if kind == "folder":
        return read_folder(path)
    if kind in SHARD_SUFFIXES:
        pattern = path
        if kind == "precomputed" or storage.path(path).is_dir():
            pattern = f"{str(path).rstrip('/')}/*{SHARD_SUFFIXES[kind]}"
        shards = storage.glob(pattern)
        if not shards:
            what = {"webdataset": "tar", "parquet": "parquet"}.get(kind, "ArrayRecord")
            raise ValueError(f"data.path={path!r}: no {what} shards ({pattern})")
        if kind == "webdataset":
            return WebDatasetSource(shards, captions)
        if kind == "parquet":
            return ParquetSource(shards, image_column, caption_columns)
        if any(storage.is_remote(shard) for shard in shards):
            raise ValueError(
                f"data.path={path!r}: ArrayRecord shards are read from local files (copy them "
                "here, or use webdataset or parquet shards in the bucket)"
            )
        return grain.sources.ArrayRecordDataSource(shards)
    raise ValueError(
        f"data.source={kind!r}: use 'manifest', 'folder', {', '.join(map(repr, SHARD_SUFFIXES))}"
    )


def dataset_options(data_config: Any) -> dict[str, Any]:
    """`make_dataset`'s keyword arguments from a run config's `data`."""
    return {"caption_weights": tuple(data_config.get("caption_weights", ()))}


def open_configured(data_config: Any) -> Any:
    """`open_source` of a run config's `data` (source, path, and where the shards keep their
    images and captions)."""
    return open_source(
        data_config.source,
        data_config.path,
        tuple(data_config.get("captions", ("txt",))),
        data_config.get("image_column", "jpg"),
        tuple(data_config.get("caption_columns", ("caption",))),
    )


def read_empty_caption(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """The T5 features of "" that `train.precompute` saved in `folder`."""
    file = io.BytesIO((storage.path(folder) / EMPTY_CAPTION_FILE).read_bytes())
    return dict(np.load(file))


# What reading or decoding one image can raise (PIL: OSError incl. UnidentifiedImageError and
# truncated files, ValueError, SyntaxError from some plugins, EOFError, DecompressionBombError).
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class Skipped:
    """The images that could not be read: a count and the first few, for the error that stops
    a run when too many are."""

    def __init__(self, keep: int = 3):
        self.count, self.examples, self.keep = 0, [], keep

    def add(self, where: str, error: Exception) -> None:
        self.count += 1
        if len(self.examples) < self.keep:
            message = " ".join(str(error).split())
            self.examples.append(f"{where} ({type(error).__name__}: {message})")

    def describe(self) -> str:
        """The first unreadable images, and what to check."""
        return f"e.g. {'; '.join(self.examples) or '-'}: check data.path and data.source"


def decode(
    record: Any, resolution: int, skipped: Skipped | None = None, time_ids: bool = False
) -> dict[str, Any]:
    """{"image": (R, R, 3) float32 in [-1, 1], "valid": bool, "caption": str}: resized so the
    short side is R, centre-cropped. With `time_ids`, also SDXL's "time_ids" (6,) float32: the
    original height and width, the crop's top and left in the resized image, R and R. An image
    that cannot be read is invalid (and added to `skipped`); a record without an image is a
    ValueError."""
    if isinstance(record, bytes):
        record = msgpack.unpackb(record)
    if not isinstance(record, dict) or not isinstance(record.get("image"), bytes | str):
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(
            f"a data record is not an image-caption record (found {fields}): does data.source "
            "name the kind of data data.path holds?"
        )
    caption = str(record.get("caption", ""))
    try:
        source = record["image"]
        encoded = source if isinstance(source, bytes) else storage.path(source).read_bytes()
        data = io.BytesIO(encoded)
        with Image.open(data) as image:
            image = image.convert("RGB")
            original = (image.height, image.width)
            scale = resolution / min(image.size)
            size = (
                max(resolution, round(image.width * scale)),
                max(resolution, round(image.height * scale)),
            )
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
            pixels = np.asarray(image, np.float32) / 127.5 - 1.0
        decoded = {"image": pixels, "valid": True, "caption": caption}
        if time_ids:
            sizes = (*original, top, left, resolution, resolution)
            decoded["time_ids"] = np.asarray(sizes, np.float32)
        return decoded
    except IMAGE_ERRORS as e:  # skipped by the loss, counted by the metrics
        if skipped is not None:
            where = record.get("where") or (
                source if isinstance(source, str) else f"an encoded image, caption {caption!r}"
            )
            skipped.add(where, e)
        decoded = {
            "image": np.zeros((resolution, resolution, 3), np.float32),
            "valid": False,
            "caption": "",
        }
        if time_ids:
            decoded["time_ids"] = np.zeros(6, np.float32)
        return decoded


def online_examples(
    tokenize: Callable[[str], tuple[np.ndarray, np.ndarray]],
    resolution: int,
    skipped: Skipped | None = None,
    sdxl_tokenize: Callable[[str], np.ndarray] | None = None,
) -> Callable[[Any, bool], dict]:
    """prepare(record, drop_caption) for image-caption records: {"image" (R, R, 3), "valid",
    "input_ids" (T,), "token_mask" (T,)}; the frozen T5 and VAE run in the train step. Images
    that cannot be read are added to `skipped`. With `sdxl_tokenize` (caption -> SDXL's second
    CLIP's token ids), also "clip_2_ids" (77,) and "time_ids" (6,) for SDXL's added
    conditions."""

    def prepare(record: Any, drop_caption: bool) -> dict:
        decoded = decode(record, resolution, skipped, time_ids=sdxl_tokenize is not None)
        caption = "" if drop_caption else decoded.pop("caption")
        decoded.pop("caption", None)
        ids, mask = tokenize(caption)
        if sdxl_tokenize is not None:
            decoded["clip_2_ids"] = sdxl_tokenize(caption)
        return {**decoded, "input_ids": ids, "token_mask": mask}

    return prepare


def precomputed_examples(empty: dict[str, np.ndarray]) -> Callable[[Any, bool], dict]:
    """prepare(record, drop_caption) for `train.precompute` records: {"latent_mean",
    "latent_logvar" (h, w, c), "valid", "t5_features" (T, D), "token_mask" (T,)}, and SDXL's
    "pooled" (P,) and "time_ids" (6,) when the records hold them; a dropped caption takes the
    empty caption's text fields `empty` ("t5_features", "token_mask", "pooled")."""

    def prepare(record: Any, drop_caption: bool) -> dict:
        fields = unpack_arrays(msgpack.unpackb(record))
        if "latent_mean" not in fields:
            raise ValueError(
                f"a data record is not a train.precompute record (found {sorted(fields)}): "
                "does data.source name the kind of data data.path holds?"
            )
        text = empty if drop_caption else fields
        example = {
            "latent_mean": fields["latent_mean"],
            "latent_logvar": fields["latent_logvar"],
            "valid": np.bool_(True),
            "t5_features": text["t5_features"],
            "token_mask": text["token_mask"],
        }
        if "pooled" in fields:  # SDXL: the caption's pooled embedding, the image's time ids
            example.update(pooled=text["pooled"], time_ids=fields["time_ids"])
        return example

    return prepare


def latent_moments_spec(vae: Any, vae_params: Any, batch: int, resolution: int) -> Any:
    """The ShapeDtypeStruct of a precomputed batch's "latent_mean" (and "latent_logvar"): what
    the frozen VAE's encoder gives for `batch` images of `resolution` pixels (not run)."""
    images = jax.ShapeDtypeStruct((batch, resolution, resolution, 3), np.float32)
    encode = lambda params, x: vae.apply({"params": params}, x, method="encode")  # noqa: E731
    return jax.eval_shape(encode, vae_params, images)[0]


def pack_arrays(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """numpy arrays -> msgpack-able {"dtype", "shape", "data"} (other values kept as they are)."""
    return {
        k: {"dtype": v.dtype.str, "shape": list(v.shape), "data": v.tobytes()}
        if isinstance(v, np.ndarray)
        else v
        for k, v in arrays.items()
    }


def unpack_arrays(packed: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `pack_arrays`."""
    return {
        k: np.frombuffer(v["data"], np.dtype(v["dtype"])).reshape(v["shape"])
        if isinstance(v, dict)
        else v
        for k, v in packed.items()
    }


def make_dataset(
    source: Any,
    prepare: Callable[[Any, bool], dict],
    global_batch: int,
    caption_dropout: float,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    caption_weights: Sequence[float] = (),
) -> grain.MapDataset:
    """Per-process batches (dicts of (L, ...) arrays, from `prepare(record, drop_caption)`) of the
    global batches, L = global_batch / process_count. A record with several captions gives one
    per example and step, drawn with `caption_weights` (by position; those of the captions a
    record has, renormalised) or uniformly when there are none."""
    if global_batch % process_count:
        raise ValueError(f"batch_size={global_batch} is not divisible by {process_count} processes")
    if any(w < 0 for w in caption_weights) or (caption_weights and not sum(caption_weights)):
        raise ValueError(
            f"data.caption_weights={tuple(caption_weights)}: use weights >= 0, not all 0"
        )
    local = global_batch // process_count
    examples = grain.MapDataset.source(source).seed(seed).shuffle().repeat()

    def example(k: int) -> dict:
        index = (k // local) * global_batch + process_index * local + k % local
        # Seeded by the global index, so the result does not depend on the process count.
        rng = np.random.default_rng([seed, index])
        drop_caption = rng.random() < caption_dropout
        record = examples[index]
        if isinstance(record, dict) and "captions" in record:
            captions = record["captions"]
            weights = np.asarray(caption_weights[: len(captions)], np.float64)
            if len(weights) < len(captions) or not weights.sum():
                chosen = rng.integers(len(captions))
            else:
                chosen = rng.choice(len(captions), p=weights / weights.sum())
            record = {**record, "caption": captions[chosen]}
        return prepare(record, drop_caption)

    rows = grain.MapDataset.range(0, (len(examples) // global_batch) * local)
    return rows.map(example).batch(local, drop_remainder=True)
