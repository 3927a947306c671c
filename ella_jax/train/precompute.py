"""python -m train.precompute --config configs/X.py --out DIR [--config.key=value ...]

Runs the frozen VAE encoder and text model (`config.text_encoder`: a T5 or a decoder-only LLM)
once over a config's data and writes what the train step would compute from them: ArrayRecord
shards of {"latent_mean", "latent_logvar", "t5_features" (the text model's, whichever it is),
"token_mask", "caption"} (and "complex", a SUR-adapter record's complex caption) per image, and
the empty caption's features (for caption dropout); for an SDXL folder also each caption's
pooled embedding (the frozen text_encoder_2's) and each image's time ids. Train from them with
`--config.data.source=precomputed --config.data.path=DIR`: the step then runs only ELLA and the
UNet, with the same numbers as the online path. For a SUR-adapter config (config.method="sur")
it also writes `llm_vectors.safetensors`: one vector per caption (the empty one included), the
text model's hidden state (at `config.text_encoder.layer`) pooled over the caption's real
tokens: their mean, or the last one (`config.sur.llm_pooling` "mean" or "last").
Unreadable images are left out and counted. DIR is written whole or not at all (staged locally,
then uploaded when it is a gs:// or s3:// URI; training reads ArrayRecord shards from local
disk).
"""

import json
import os

import jax
import msgpack
import numpy as np
from absl import app, flags
from array_record.python.array_record_module import ArrayRecordWriter
from ml_collections import ConfigDict, config_flags
from tqdm import tqdm

from ella_jax import storage
from ella_jax.storage import atomic_path
from ella_jax.text import load_tokenizer, tokenize
from ella_jax.train import data
from ella_jax.train.cli import flags_parser, run_command
from ella_jax.train.errors import ConfigError
from ella_jax.train.sur import LLM_VECTORS_FILE
from ella_jax.train.text_encoder import text_encoder
from ella_jax.weights.diffusers import is_sdxl, load_sdxl_text_encoder_2, load_vae
from ella_jax.weights.tensors import write_safetensors

POOLINGS = ("mean", "last")


def precompute(
    config: ConfigDict, out: str | os.PathLike, overwrite: bool = False, shard_size: int = 4096
) -> dict:
    """Writes the precomputed folder `out`; returns its summary (also in `out/precompute.json`)."""
    sur = config.get("method", "ella") == "sur"
    pooling = config.sur.get("llm_pooling", "mean") if sur else "mean"
    if pooling not in POOLINGS:
        raise ConfigError(f"config.sur.llm_pooling={pooling!r}: use one of {', '.join(POOLINGS)}")
    encoder = text_encoder(config)
    text_model, text_params = encoder.load()
    tokenizer = load_tokenizer(encoder.path)
    vae, vae_params = load_vae(storage.path(config.sd) / "vae", config.dtype)
    records = data.open_configured(config.data)
    encode_text = jax.jit(lambda ids, mask: text_model(text_params, ids, mask))
    pooled_of = sdxl_pooling(config) if not sur else None
    encode_image = jax.jit(lambda x: vae.apply({"params": vae_params}, x, method="encode"))
    batch = config.batch_size
    written = skipped = 0
    pooled: dict[str, np.ndarray] = {}  # caption -> its real tokens' features, pooled

    with atomic_path(out, overwrite=overwrite) as staging:
        staging.mkdir()
        ids, mask = tokenize(tokenizer, [""], config.token_length)
        empty = np.asarray(encode_text(ids, mask))[0]
        sdxl_empty = {} if pooled_of is None else {"pooled": pooled_of([""])[0]}
        np.savez(
            staging / data.EMPTY_CAPTION_FILE, t5_features=empty, token_mask=mask[0], **sdxl_empty
        )
        pooled[""] = pool_tokens(empty, mask[0], pooling)
        writer = None
        for start in tqdm(range(0, len(records), batch), desc="precompute", unit="batch"):
            indices = range(start, min(start + batch, len(records)))
            decoded = [
                {
                    **data.decode(records[i], config.data.resolution, time_ids=bool(pooled_of)),
                    **_complex(records[i]),
                }
                for i in indices
            ]
            skipped += sum(not d["valid"] for d in decoded)
            decoded = [d for d in decoded if d["valid"]]
            if not decoded:
                continue
            count = len(decoded)
            # Pad to the batch size so one compilation serves every batch.
            padded = decoded + [decoded[-1]] * (batch - count)
            ids, mask = tokenize(tokenizer, [d["caption"] for d in padded], config.token_length)
            features = np.asarray(encode_text(ids, mask))
            captions = [d["caption"] for d in padded]
            sdxl_pooled = None if pooled_of is None else pooled_of(captions)
            mean, logvar = (
                np.asarray(a) for a in encode_image(np.stack([d["image"] for d in padded]))
            )
            for i in range(count):
                if written % shard_size == 0:
                    if writer is not None:
                        writer.close()
                    shard = staging / f"shard-{written // shard_size:05d}.array_record"
                    writer = ArrayRecordWriter(str(shard), "group_size:1")
                fields = dict(
                    latent_mean=mean[i],
                    latent_logvar=logvar[i],
                    t5_features=features[i],
                    token_mask=mask[i],
                    caption=padded[i]["caption"],
                    **_complex(padded[i]),
                )
                if sdxl_pooled is not None:
                    fields.update(pooled=sdxl_pooled[i], time_ids=padded[i]["time_ids"])
                caption = padded[i]["caption"]
                if caption not in pooled:
                    pooled[caption] = pool_tokens(features[i], mask[i], pooling)
                writer.write(msgpack.packb(data.pack_arrays(fields)))
                written += 1
        if writer is not None:
            writer.close()
        summary = dict(
            examples=written,
            skipped_images=skipped,
            source=f"{config.data.source}:{config.data.path}",
            resolution=config.data.resolution,
            token_length=config.token_length,
            t5=encoder.path,
            sd=str(config.sd),
            t5_dtype=encoder.dtype,
            **encoder.summary(),
            sdxl=pooled_of is not None,
        )
        if sur:
            summary["llm_pooling"] = pooling
            write_safetensors(pooled, staging / LLM_VECTORS_FILE)
        (staging / "precompute.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def sdxl_pooling(config: ConfigDict):
    """pooled(captions) -> (B, P) float32 numpy, SDXL's frozen second CLIP's projected pooled
    embeddings, for an SDXL folder (`text_encoder_2/`); None for another model."""
    if not is_sdxl(config.sd):
        return None
    clip_2, params, _ = load_sdxl_text_encoder_2(config.sd, config.dtype)
    tokenizer_2 = load_tokenizer(storage.path(config.sd) / "tokenizer_2")
    encode = jax.jit(lambda ids: clip_2.apply({"params": params}, ids, True)[1])
    length = clip_2.config.max_position_embeddings

    def pooled(captions: list[str]) -> np.ndarray:
        return np.asarray(encode(tokenize(tokenizer_2, captions, length)[0]), np.float32)

    return pooled


def _complex(record) -> dict:
    """{"complex": caption} of a record that has one (SUR-adapter's), else {}."""
    if isinstance(record, bytes):
        record = msgpack.unpackb(record)
    return {"complex": record["complex"]} if "complex" in record else {}


def pool_tokens(features: np.ndarray, mask: np.ndarray, pooling: str) -> np.ndarray:
    """(T, D) features, (T,) mask (right padding) -> (D,) float32: the mean over the real
    tokens, or the last real token's."""
    features = features.astype(np.float32)
    if pooling == "last":
        return features[max(int(mask.sum()) - 1, 0)]
    weights = mask.astype(np.float32)[:, None]
    return (features * weights).sum(0) / max(weights.sum(), 1.0)


def run() -> None:
    """The command (`python -m train.precompute`, `ella-jax-precompute`)."""
    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Training config file.", lock_config=True
    )
    out = flags.DEFINE_string("out", None, "Folder to create with the precomputed shards.")
    overwrite = flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
    flags.mark_flags_as_required(["config", "out"])

    def main(argv: list[str]) -> int:
        def command(config: ConfigDict) -> None:
            print(precompute(config, out.value, overwrite.value))

        return run_command(argv, config_flag, command)

    app.run(main, flags_parser=flags_parser(__doc__))


if __name__ == "__main__":
    run()
