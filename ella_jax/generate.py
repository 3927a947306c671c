"""python -m ella_jax.generate: render prompts with ELLA to PNG files (and DPG-Bench grids)."""

import argparse
import collections
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from etils import epath
from PIL import Image

from ella_jax import storage
from ella_jax.cli import error_exit
from ella_jax.images import grid, save_png
from ella_jax.plugin import PluginError, load_function
from ella_jax.weights.tensors import CheckpointError, read_json

DESCRIPTION = """\
Render prompts with ELLA (T5 -> ELLA connector -> Stable Diffusion UNet) to PNG files.

Prompts come from --prompt (repeatable), --prompts-file (one per line) or --dpg-bench (DPG-Bench's
dpg_bench.csv, or a TSV of id<TAB>prompt lines, as data/dpg_bench_prompts.tsv).

  prompts    one PNG per prompt, OUT/<index>_<slug>.png, and OUT/grid.png of all of them when
             there are several. The image of prompt i uses the seed SEED + i, whatever the
             batch size. Each PNG records the prompt and the settings in its metadata (text
             chunks "prompt" and "ella-jax", the latter JSON).
  DPG-Bench  per prompt, 4 images with seeds SEED..SEED+3 tiled 2x2 into OUT/<id>.png, the
             layout DPG-Bench's evaluation reads (python -m ella_jax.dpg_bench score).
             Resumable: ids whose PNG exists are skipped, and every PNG is written whole or
             not at all.

Errors print one line and exit with status 2.
"""

DPG_IMAGES = 4  # DPG-Bench scores a 2x2 grid of four samples per prompt
DPG_HEADER_COLUMNS = {"prompt", "prompts", "text", "caption"}


class UsageError(Exception):
    """A bad argument or input file; the message says why."""


def slugify(prompt: str, max_length: int = 60) -> str:
    """`prompt` lowercased, runs of characters other than a-z and 0-9 turned into one '-', at
    most `max_length` characters; "prompt" when nothing is left."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return slug[:max_length].rstrip("-") or "prompt"


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a text file, stripped."""
    path = storage.reachable(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such prompts file")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [prompt for prompt in prompts if prompt]
    if not prompts:
        raise UsageError(f"{path}: no prompts (every line is blank)")
    return prompts


def read_dpg_bench(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(id, prompt) pairs from DPG-Bench's CSV (a .csv: its item_id and text columns) or from
    `id<TAB>prompt` lines, where a header row (id<TAB>prompt or text) and blank lines are
    skipped. Ids must be unique and usable as file names."""
    path = storage.reachable(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such DPG-Bench prompts file")
    if path.suffix.lower() == ".csv":
        from ella_jax.dpg_bench.questions import BenchmarkError, read_prompts

        try:
            numbered = [(None, key, prompt) for key, prompt in read_prompts(path)]
        except BenchmarkError as e:
            raise UsageError(str(e)) from None
    else:
        numbered = _read_tsv(path)
    for number, key, _ in numbered:
        where = f"{path}:{number}" if number else f"{path}: item {key}"
        if not re.fullmatch(r"[\w.-]+", key) or key.startswith("."):
            raise UsageError(f"{where}: id {key!r} cannot be a file name")
    items = [(key, prompt) for _, key, prompt in numbered]
    counts = collections.Counter(key for key, _ in items)
    duplicates = sorted(key for key, count in counts.items() if count > 1)
    if duplicates:
        raise UsageError(f"{path}: duplicate ids {', '.join(duplicates[:5])}")
    return items


def _read_tsv(path: epath.Path) -> list[tuple[int, str, str]]:
    """(line number, id, prompt) per `id<TAB>prompt` line."""
    items: list[tuple[int, str, str]] = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        key, tab, prompt = line.partition("\t")
        key, prompt = key.strip(), prompt.strip()
        if not items and prompt.lower() in DPG_HEADER_COLUMNS:
            continue
        if not tab or not key or not prompt:
            raise UsageError(f"{path}:{number}: expected 'id<TAB>prompt'")
        items.append((number, key, prompt))
    if not items:
        raise UsageError(f"{path}: no prompts")
    return items


def save_with_metadata(image: Image.Image, path: epath.Path, metadata: dict) -> None:
    """Writes `image` atomically with `metadata` as the JSON text chunk "ella-jax" and each of
    its prompts as a chunk of its own."""
    prompts = {
        k: metadata[k] for k in ("prompt", "upsampled_prompt") if isinstance(metadata.get(k), str)
    }
    save_png(image, path, {**prompts, "ella-jax": json.dumps(metadata)})


class Renderer:
    """The pipeline with this run's settings: renders (prompt, seed) jobs in fixed-size batches,
    so the sampler compiles once per mode, with each image's noise drawn from its own seed."""

    def __init__(self, pipe, args: argparse.Namespace, upsample: Callable | None) -> None:
        self.pipe = pipe
        self.args = args
        self.upsample = upsample
        self.upsampled: dict[str, str] = {}
        vae = pipe.modules["vae"].config
        factor = 2 ** (len(vae.block_out_channels) - 1)
        self.latent_shape = (args.size // factor, args.size // factor, vae.latent_channels)

    def text(self, prompt: str) -> str:
        """What the text encoders get for `prompt`: the upsampled caption if asked for."""
        if self.upsample is None:
            return prompt
        if prompt not in self.upsampled:
            from ella_jax.captions import upsample_caption

            self.upsampled[prompt] = upsample_caption(prompt, self.upsample)
        return self.upsampled[prompt]

    def noise(self, seeds: Sequence[int]) -> np.ndarray:
        """(B, h, w, C) initial latents, image b drawn from `jax.random.key(seeds[b])`."""
        import jax

        return np.stack(
            [np.asarray(jax.random.normal(jax.random.key(s), self.latent_shape)) for s in seeds]
        )

    def batches(self, jobs: Sequence[tuple[str, int]], mode: str) -> Iterator[list[Image.Image]]:
        """Yields the images of `jobs` (prompt, seed), batch by batch, in order. The last batch
        is padded with copies of its last job so every call has the same shapes (fewer jobs than
        the batch size: one batch of just those)."""
        size = min(self.args.batch_size, len(jobs))
        for start in range(0, len(jobs), size):
            batch = list(jobs[start : start + size])
            real = len(batch)
            batch += [batch[-1]] * (size - real)
            images = self.pipe(
                [self.text(prompt) for prompt, _ in batch],
                negative_prompt=self.args.negative_prompt,
                num_inference_steps=self.args.steps,
                guidance_scale=self.args.guidance,
                token_length=self.args.token_length,
                height=self.args.size,
                width=self.args.size,
                latents=self.noise([seed for _, seed in batch]),
                output_type="pil",
                mode=mode,
            )
            yield images[:real]

    def metadata(self, prompt: str | None = None, **extra) -> dict:
        """What a PNG records: its prompt (and the upsampled caption), `extra`, the settings."""
        args = self.args
        values: dict = {}
        if prompt is not None:
            values["prompt"] = prompt
            if self.upsample is not None:
                values["upsampled_prompt"] = self.text(prompt)
        values.update(extra)
        values.update(
            negative_prompt=args.negative_prompt,
            steps=args.steps,
            guidance=args.guidance,
            size=args.size,
            token_length=args.token_length,
            mode=args.mode,
            scheduler=self.pipe.scheduler.kind,
            dtype=args.dtype,
            sd=str(args.sd),
            t5=str(args.t5),
            text_layer=args.text_layer,
            ella=str(args.ella),
            ella_heads=args.ella_heads,
            sur=str(args.sur),
            sur_attend=_sur_attend(self.pipe),
            upsample_captions=args.upsample_captions,
        )
        return values


def _progress(total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc="generating", dynamic_ncols=True)


def _render_prompts(renderer: Renderer, prompts: list[str], args: argparse.Namespace) -> str:
    out = args.out
    width = len(str(len(prompts) - 1))
    jobs = [(prompt, args.seed + i) for i, prompt in enumerate(prompts)]
    compare = renderer.batches(jobs, "clip") if args.compare_sd else None
    all_images: list[Image.Image] = []
    with _progress(len(prompts), "prompt") as bar:
        for images in renderer.batches(jobs, args.mode):
            sd_images = next(compare) if compare is not None else [None] * len(images)
            for image, sd_image in zip(images, sd_images, strict=True):
                i = len(all_images)
                prompt, seed = jobs[i]
                name = f"{i:0{width}d}_{slugify(prompt)}"
                metadata = renderer.metadata(prompt, seed=seed, index=i)
                save_with_metadata(image, out / f"{name}.png", metadata)
                if sd_image is not None:
                    pair = Image.fromarray(grid([image, sd_image], columns=2))
                    metadata["compare"] = f"left: {args.mode}, right: clip (plain SD)"
                    save_with_metadata(pair, out / f"{name}_compare.png", metadata)
                all_images.append(image)
            bar.update(len(images))
    written = len(all_images) * (2 if args.compare_sd else 1)
    if len(all_images) > 1:
        grid_metadata = renderer.metadata(prompts=prompts, seed=args.seed)
        save_with_metadata(Image.fromarray(grid(all_images)), out / "grid.png", grid_metadata)
        written += 1
    return f"wrote {written} PNG files to {out}"


def render_dpg_bench(
    renderer: Renderer, items: list[tuple[str, str]], args: argparse.Namespace
) -> str:
    """Writes ARGS.OUT/<id>.png, the 2x2 grid of the images of seeds SEED..SEED+3, per (id,
    prompt) of `items`; `args` as `build_parser` parses them."""
    seeds = list(range(args.seed, args.seed + DPG_IMAGES))
    jobs = [(prompt, seed) for _, prompt in items for seed in seeds]
    pending: list[Image.Image] = []
    done = 0
    with _progress(len(items), "prompt") as bar:
        for images in renderer.batches(jobs, args.mode):
            pending += images
            while len(pending) >= DPG_IMAGES:
                key, prompt = items[done]
                tiles = Image.fromarray(grid(pending[:DPG_IMAGES], columns=2))
                metadata = renderer.metadata(prompt, id=key, seed=seeds[0], seeds=seeds)
                save_with_metadata(tiles, args.out / f"{key}.png", metadata)
                del pending[:DPG_IMAGES]
                done += 1
                bar.update(1)
    return f"wrote {done} DPG-Bench grids to {args.out}"


def _sur_attend(pipe) -> str | None:
    """What the pipeline's SUR-adapter attends over ("batch", "tokens"), None without one."""
    adapter = pipe.modules.get("sur")
    return None if adapter is None else adapter.attend


def _check_models(args: argparse.Namespace) -> None:
    """Fails fast, before anything heavy loads, on missing model paths and on a size the VAE
    and UNet cannot take."""
    uses_ella = args.mode in ("ella", "ella+clip")
    for flag, path, needed in (("--sd", args.sd, True), ("--t5", args.t5, uses_ella)):
        if path is None and needed:
            raise UsageError(f"--mode {args.mode} needs {flag}")
        if path is not None and not storage.reachable(path).is_dir():
            raise UsageError(f"{flag} {path}: no such directory")
    for flag, path, needed in (("--ella", args.ella, uses_ella), ("--sur", args.sur, False)):
        if path is None and needed:
            raise UsageError(f"--mode {args.mode} needs {flag}")
        if path is not None and not storage.reachable(path).exists():
            raise UsageError(f"{flag} {path}: no such file or directory")
    if args.mode == "sur" and args.sur is None:
        raise UsageError("--mode sur needs --sur")
    vae = read_json(args.sd / "vae" / "config.json")
    unet = read_json(args.sd / "unet" / "config.json")
    try:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        unet_factor = 2 ** (len(unet["block_out_channels"]) - 1)
    except (KeyError, TypeError):
        raise CheckpointError(
            f"{args.sd}: no block_out_channels in vae/ or unet/ config.json"
        ) from None
    if args.size % (factor * unet_factor):
        raise UsageError(
            f"--size {args.size} is not divisible by {factor * unet_factor} (the VAE's latent "
            f"factor {factor} times the UNet's downsampling {unet_factor})"
        )


def _run(args: argparse.Namespace) -> str:
    if args.batch_size < 1 or args.steps < 1 or args.size < 1:
        raise UsageError("--batch-size, --steps and --size must be positive")
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be positive")
    if args.dpg_bench is not None:
        items = read_dpg_bench(args.dpg_bench)[: args.limit]
    else:
        prompts = args.prompt or read_prompts_file(args.prompts_file)
        prompts = prompts[: args.limit]
        if any(not prompt.strip() for prompt in prompts):
            raise UsageError("--prompt: empty prompt")
    _check_models(args)
    upsample = (
        load_function(args.upsample_captions, "--upsample-captions")
        if args.upsample_captions
        else None
    )
    storage.reachable(args.out).mkdir(parents=True, exist_ok=True)

    if args.dpg_bench is not None:
        todo = [(key, prompt) for key, prompt in items if not (args.out / f"{key}.png").exists()]
        if len(todo) < len(items):
            print(f"{len(items) - len(todo)} of {len(items)} prompts already done in {args.out}")
        if not todo:
            return "nothing to do"

    from ella_jax.pipeline import ELLAPipeline

    pipe = ELLAPipeline.from_pretrained(
        args.sd,
        args.t5,
        args.ella,
        ella_heads=args.ella_heads,
        dtype=args.dtype,
        scheduler=args.scheduler,
        sur=args.sur,
        sur_mode=args.sur_mode,
        text_layer=args.text_layer,
    )
    if args.mode == "sur" and pipe.modules["sur"].attend == "batch" and args.batch_size > 1:
        print("the SUR-adapter attends over the batch (official): one prompt per batch")
        args.batch_size = 1
    renderer = Renderer(pipe, args, upsample)
    if args.dpg_bench is not None:
        return render_dpg_bench(renderer, todo, args)
    return _render_prompts(renderer, prompts, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ella_jax.generate",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--sd",
        type=storage.path,
        required=True,
        metavar="DIR",
        help="diffusers Stable Diffusion 1.5 or SDXL folder",
    )
    models.add_argument(
        "--t5",
        type=storage.path,
        default=None,
        metavar="DIR",
        help="ELLA's text model: a Hugging Face T5 folder (flan-t5-xl) or decoder-only LLM "
        "folder (Llama, Mistral, Qwen2); needed by the ELLA modes",
    )
    models.add_argument(
        "--text-layer",
        type=int,
        default=None,
        metavar="K",
        help="the LLM's hidden-state entry the connector was trained on (transformers' "
        "numbering; default: the last hidden state, as config.text_encoder.layer unset)",
    )
    models.add_argument(
        "--ella",
        type=storage.path,
        default=None,
        metavar="PATH",
        help="official ELLA .safetensors (ella-sd1.5-tsc-t5xl) or a converted directory; "
        "needed by the ELLA modes",
    )
    models.add_argument(
        "--sur",
        type=storage.path,
        default=None,
        metavar="PATH",
        help="SUR-adapter: official .safetensors (sur_config.json beside it) or a converted "
        "directory; with it, --mode defaults to sur",
    )
    models.add_argument(
        "--sur-mode",
        choices=("official", "fixed"),
        default=None,
        help="SUR-adapter attention: official (over the [negative; positive] batch, as "
        "released; then one prompt per batch, so that no prompt changes another's image) or "
        "fixed (over each prompt's tokens) (default: what the file stores, as this project's "
        "exports do, else official)",
    )
    models.add_argument(
        "--ella-heads",
        type=int,
        metavar="N",
        default=None,
        help="ELLA attention heads, for an official file that stores none (this project's "
        "exports carry them; 8 for the released shapes); one that contradicts them is an error",
    )
    models.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="UNet, VAE, CLIP and ELLA dtype; T5 runs in float32 in a float32 run, else float16 "
        "(default: float32)",
    )

    source = parser.add_argument_group("prompts (exactly one source)")
    sources = source.add_mutually_exclusive_group(required=True)
    sources.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a prompt; repeat the option for several"
    )
    sources.add_argument(
        "--prompts-file",
        type=storage.path,
        metavar="FILE",
        help="text file, one prompt per line (blank lines skipped)",
    )
    sources.add_argument(
        "--dpg-bench",
        type=storage.path,
        metavar="FILE",
        help="DPG-Bench prompts: its dpg_bench.csv, or id<TAB>prompt lines (e.g. "
        "data/dpg_bench_prompts.tsv)",
    )
    source.add_argument(
        "--limit", type=int, default=None, metavar="N", help="only the first N prompts"
    )
    source.add_argument(
        "--upsample-captions",
        metavar="MODULE:FUNCTION",
        default=None,
        help="rewrite every prompt into a dense caption first with ella_jax.captions."
        "upsample_caption and this function (chat messages -> reply text, your LLM call); "
        "MODULE is a module name or a .py file. The caption goes to every text encoder (T5, "
        "and CLIP in the ella+clip, clip and --compare-sd renders); the PNG metadata keeps both.",
    )

    sampling = parser.add_argument_group("sampling")
    sampling.add_argument(
        "--out", type=storage.path, required=True, metavar="DIR", help="output folder (created)"
    )
    sampling.add_argument(
        "--steps", type=int, default=50, metavar="N", help="sampler steps (default: 50)"
    )
    sampling.add_argument(
        "--guidance",
        type=float,
        default=12.0,
        metavar="SCALE",
        help="classifier-free guidance (default: 12.0)",
    )
    sampling.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="SEED",
        help="seed of the first image; image i uses SEED + i (default: 0)",
    )
    sampling.add_argument(
        "--size",
        type=int,
        default=512,
        metavar="PIXELS",
        help="image height and width in pixels (default: 512)",
    )
    sampling.add_argument(
        "--token-length",
        choices=("fixed", "flexible"),
        default="fixed",
        help="T5 tokens: 'fixed' pads and truncates to 128 as ELLA's reference inference; "
        "'flexible' keeps each prompt's own tokens (default: fixed)",
    )
    sampling.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        default=4,
        help="images per pipeline call; the last batch is padded, so one compilation serves all "
        "(default: 4)",
    )
    sampling.add_argument(
        "--negative-prompt",
        default=None,
        metavar="TEXT",
        help="negative prompt for every image (default: none: the empty prompt, or zeros for "
        "an SDXL folder with force_zeros_for_empty_prompt, as diffusers)",
    )
    sampling.add_argument(
        "--scheduler",
        choices=("dpm", "ddim", "euler"),
        default=None,
        help="sampler, overriding the SD folder's scheduler class (default: the folder's)",
    )
    sampling.add_argument(
        "--mode",
        choices=("ella", "ella+clip", "clip", "sur"),
        default=None,
        help="UNet context: ELLA's tokens, ELLA's then CLIP's, CLIP's alone (plain SD), or "
        "CLIP's through the SUR-adapter (default: sur with --sur and no --ella, else ella)",
    )
    sampling.add_argument(
        "--compare-sd",
        action="store_true",
        help="also render each prompt with plain SD (mode clip, same seed) and write "
        "<index>_<slug>_compare.png, ELLA left and SD right",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.mode is None:
        args.mode = "sur" if args.sur is not None and args.ella is None else "ella"
    if args.compare_sd and args.dpg_bench is not None:
        parser.error("--compare-sd does not apply to --dpg-bench")
    if args.compare_sd and args.mode == "clip":
        parser.error("--compare-sd with --mode clip would compare plain SD with itself")
    try:
        print(_run(args))
    except (UsageError, CheckpointError, PluginError, OSError) as e:
        return error_exit(e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
