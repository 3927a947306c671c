"""python -m ella_jax.generate: render prompts with ELLA to PNG files (and DPG-Bench grids)."""

import argparse
import collections
import contextlib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from etils import epath
from PIL import Image

from ella_jax import storage
from ella_jax.cli import error_exit, finite_float, natural_int, positive_int
from ella_jax.images import grid, save_png
from ella_jax.plugin import PluginError, load_function
from ella_jax.weights.tensors import CheckpointError, read_json
from ella_jax.weights.trained_run import TrainedWith, check_text_model, checkpoint_in, trained_with

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

Outputs never touch the inputs: an --out that is, holds or lies in a model folder, a
connector's run or a prompts file is refused, and --overwrite replaces only what this command
writes (PNG files and settings.json). Errors print one line and exit with status 2; an
interrupted run (Ctrl-C, SIGTERM) leaves no half-written output and exits with status 130.
"""

DPG_IMAGES = 4  # DPG-Bench scores a 2x2 grid of four samples per prompt
GAP = 2  # pixels between the cells of grid.png and of the comparisons
SCHEDULER_FLAGS = {"dpmsolver": "dpm", "ddim": "ddim", "euler": "euler"}  # kind: --scheduler
SETTINGS_FILE = "settings.json"  # a DPG-Bench output's settings: a resume must match them
DPG_HEADER_COLUMNS = {"prompt", "prompts", "text", "caption"}
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 12.0  # ELLA's reference inference, where no run says


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
    prompts = [line.strip() for line in storage.read_text(path).splitlines()]
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
    from ella_jax.dpg_bench.questions import BenchmarkError, check_item_id, read_prompts

    try:
        if path.suffix.lower() == ".csv":
            items = read_prompts(path)  # its ids checked
        else:
            items = []
            for number, key, prompt in _read_tsv(path):
                check_item_id(key, f"{path}:{number}")
                items.append((key, prompt))
    except BenchmarkError as e:
        raise UsageError(str(e)) from None
    counts = collections.Counter(key for key, _ in items)
    duplicates = sorted(key for key, count in counts.items() if count > 1)
    if duplicates:
        raise UsageError(f"{path}: duplicate ids {', '.join(duplicates[:5])}")
    return items


def _read_tsv(path: epath.Path) -> list[tuple[int, str, str]]:
    """(line number, id, prompt) per `id<TAB>prompt` line."""
    items: list[tuple[int, str, str]] = []
    for number, line in enumerate(storage.read_text(path).splitlines(), start=1):
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
        factor, channels = pipe.vae_scale_factor, pipe.modules["vae"].config.latent_channels
        self.latent_shape = (args.size // factor, args.size // factor, channels)

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
            scheduler=SCHEDULER_FLAGS[self.pipe.scheduler.kind],
            dtype=args.dtype,
            sd=_text(args.sd),
            t5=_text(args.t5),
            text_layer=args.text_layer,
            ella=_text(args.ella),
            ella_heads=args.ella_heads,
            sur=_text(args.sur),
            sur_attend=_sur_attend(self.pipe),
            upsample_captions=args.upsample_captions,
        )
        return values


def _text(location: os.PathLike | None) -> str | None:
    """A path as the metadata records it (None stays None, not "None")."""
    return None if location is None else os.fspath(location)


def _progress(total: int, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc="generating", dynamic_ncols=True)


def _render_prompts(renderer: Renderer, prompts: list[str], args: argparse.Namespace) -> str:
    """Writes the prompts' PNGs and grid.png into a staging folder that replaces ARGS.OUT when
    all are written: a failed run leaves nothing, and no file of an earlier run stays beside."""
    width = len(str(len(prompts) - 1))
    jobs = [(prompt, args.seed + i) for i, prompt in enumerate(prompts)]
    compare = renderer.batches(jobs, "clip") if args.compare_sd else None
    cells: list[Image.Image] = []  # the grid's: each image, or each ELLA | SD pair
    with storage.atomic_path(args.out, overwrite=True) as out:
        out.mkdir()
        with _progress(len(prompts), "prompt") as bar:
            for images in renderer.batches(jobs, args.mode):
                sd_images = next(compare) if compare is not None else [None] * len(images)
                for image, sd_image in zip(images, sd_images, strict=True):
                    i = len(cells) // (2 if compare else 1)
                    prompt, seed = jobs[i]
                    name = f"{i:0{width}d}_{slugify(prompt)}"
                    metadata = renderer.metadata(prompt, seed=seed, index=i)
                    save_with_metadata(image, out / f"{name}.png", metadata)
                    cells.append(image)
                    if sd_image is not None:
                        pair = Image.fromarray(grid([image, sd_image], columns=2, gap=GAP))
                        metadata["compare"] = f"left: {args.mode}, right: clip (plain SD)"
                        save_with_metadata(pair, out / f"{name}_compare.png", metadata)
                        cells.append(sd_image)
                bar.update(len(images))
        written = len(cells)
        if len(prompts) > 1:
            layout = {"cells": "row-major, a prompt a cell"}
            if compare is not None:
                layout = {"cells": f"a prompt a row: left {args.mode}, right clip (plain SD)"}
            grid_metadata = renderer.metadata(prompts=prompts, seed=args.seed, **layout)
            columns = 2 if compare is not None else None
            image = Image.fromarray(grid(cells, columns=columns, gap=GAP))
            save_with_metadata(image, out / "grid.png", grid_metadata)
            written += 1
    return f"wrote {written} PNG files to {args.out}"


def render_dpg_bench(
    renderer: Renderer,
    items: list[tuple[str, str]],
    args: argparse.Namespace,
    settings: dict | None = None,
) -> str:
    """Writes ARGS.OUT/<id>.png, the 2x2 grid of the images of seeds SEED..SEED+3, per (id,
    prompt) of `items`; `args` as `build_parser` parses them. `settings`: written to
    ARGS.OUT/settings.json with the first grid (what a resume must match)."""
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
                if settings is not None and done == 0:
                    with storage.atomic_path(args.out / SETTINGS_FILE, overwrite=True) as staged:
                        staged.write_text(json.dumps(settings, indent=2) + "\n")
                save_with_metadata(tiles, args.out / f"{key}.png", metadata)
                del pending[:DPG_IMAGES]
                done += 1
                bar.update(1)
    return f"wrote {done} DPG-Bench grids to {args.out}"


def _sur_attend(pipe) -> str | None:
    """What the pipeline's SUR-adapter attends over ("batch", "tokens"), None without one."""
    adapter = pipe.modules.get("sur")
    return None if adapter is None else adapter.attend


def _check_models(args: argparse.Namespace) -> TrainedWith | None:
    """Fails fast, before anything heavy loads, on missing model paths, on a size the VAE and
    UNet cannot take, and on flags or a text model that contradict the connector's run;
    returns the run's settings (None: no run's connector)."""
    uses_ella = args.mode in ("ella", "ella+clip")
    if args.ella is not None and args.t5 is None:
        raise UsageError(f"--ella {args.ella} needs --t5: the connector reads its text features")
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
    trained = _check_trained_settings(args)
    vae = read_json(args.sd / "vae" / "config.json")
    unet = read_json(args.sd / "unet" / "config.json")
    try:
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        unet_factor = 2 ** (len(unet["block_out_channels"]) - 1)
    except (KeyError, TypeError):
        raise CheckpointError(
            f"{args.sd}: no block_out_channels in vae/ or unet/ config.json"
        ) from None
    if args.size is not None and args.size % (factor * unet_factor):
        raise UsageError(
            f"--size {args.size} is not divisible by {factor * unet_factor} (the VAE's latent "
            f"factor {factor} times the UNet's downsampling {unet_factor})"
        )
    return trained


def _check_trained_settings(args: argparse.Namespace) -> TrainedWith | None:
    """A connector a run exported is sampled as it trained (the settings in its metadata or
    its run's config.json: the pipeline's defaults); a flag that contradicts the run, or a
    text model of another architecture (unless --force-text-model), is an error."""
    if args.ella is None:
        return None
    trained = trained_with(checkpoint_in(args.ella))
    if trained is None:
        return None
    padding = "masked" if trained.token_length == "flexible" else "attended"
    if args.token_length not in (None, trained.token_length):
        raise UsageError(
            f"--token-length {args.token_length}: {trained.source} trained the connector with "
            f"its padding {padding} (token length {trained.token_length}); leave the flag out"
        )
    if args.text_layer not in (None, trained.text_layer):
        raise UsageError(
            f"--text-layer {args.text_layer}: {trained.source} trained the connector on layer "
            f"{trained.text_layer} (None: the last); leave the flag out"
        )
    if not args.force_text_model:
        check_text_model(trained, args.t5)
    return trained


def _sampling_defaults(args: argparse.Namespace, trained: TrainedWith | None) -> None:
    """--steps and --guidance where not given: those of the run's own samples
    (config.sample_steps, sample_guidance), else ELLA's reference inference's."""
    if args.steps is None:
        args.steps = (trained and trained.sample_steps) or DEFAULT_STEPS
    if args.guidance is None:
        known = trained is not None and trained.sample_guidance is not None
        args.guidance = trained.sample_guidance if known else DEFAULT_GUIDANCE


def _check_out(args: argparse.Namespace) -> None:
    """Refuses an --out whose writing would touch an input: the same location as an input, or
    one that holds an input or lies inside one (with --overwrite it would be replaced)."""
    inputs = {"--sd": args.sd, "--t5": args.t5, "--ella": args.ella, "--sur": args.sur,
              "--prompts-file": args.prompts_file, "--dpg-bench": args.dpg_bench}  # fmt: skip
    for flag, location in inputs.items():
        if location is not None and storage.overlap(args.out, location):
            raise UsageError(
                f"--out {args.out}: overlaps {flag} {location} (one is or holds the other), "
                "which writing the images would change: use another folder"
            )


def _check_replaceable(out: epath.Path, overwrite: bool) -> None:
    """An --out that holds files is replaced only with --overwrite, and only when they are all
    of this command's kind (PNG files, settings.json): never a folder of other files."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: not a folder")
    if not out.exists() or not any(out.iterdir()):
        return
    if not overwrite:
        raise UsageError(
            f"--out {out}: not empty; use a new folder, or --overwrite to replace it whole"
        )
    for entry in sorted(out.iterdir()):
        ours = entry.suffix.lower() == ".png" or entry.name == SETTINGS_FILE
        if not ours and not storage.is_staging(entry.name):
            raise UsageError(
                f"--out {out}: holds {entry.name}, which this command does not write; "
                f"--overwrite replaces only its outputs (PNG files, {SETTINGS_FILE}): use "
                "another folder"
            )


def _run(args: argparse.Namespace) -> str:
    _check_out(args)
    if args.dpg_bench is not None:
        items = read_dpg_bench(args.dpg_bench)[: args.limit]
    else:
        prompts = args.prompt or read_prompts_file(args.prompts_file)
        prompts = prompts[: args.limit]
        if any(not prompt.strip() for prompt in prompts):
            raise UsageError("--prompt: empty prompt")
    trained = _check_models(args)
    _sampling_defaults(args, trained)
    upsample = (
        load_function(args.upsample_captions, "--upsample-captions")
        if args.upsample_captions
        else None
    )
    out = storage.reachable(args.out)
    settings = _settings(args)
    if args.dpg_bench is not None:
        _check_resumable(out, settings, args.overwrite)
        todo = [(key, prompt) for key, prompt in items if not (out / f"{key}.png").exists()]
        if len(todo) < len(items):
            print(f"{len(items) - len(todo)} of {len(items)} prompts already done in {out}")
        if not todo:
            return "nothing to do"
    else:
        _check_replaceable(out, args.overwrite)
    print("loading the models ...", flush=True)

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
        force_text_model=args.force_text_model,
    )
    # What the pipeline takes from its models and the connector's run when no flag says.
    args.size = args.size or pipe.default_size
    args.token_length = args.token_length or pipe.token_length
    if args.mode == "sur" and pipe.modules["sur"].attend == "batch" and args.batch_size > 1:
        print("the SUR-adapter attends over the batch (official): one prompt per batch")
        args.batch_size = 1
    renderer = Renderer(pipe, args, upsample)
    if args.dpg_bench is not None:
        return render_dpg_bench(renderer, todo, args, settings)
    return _render_prompts(renderer, prompts, args)


def _settings(args: argparse.Namespace) -> dict:
    """What a DPG-Bench output's grids depend on, as given: the flags, and the version (size
    and modification time) of each checkpoint, so that a retrained connector counts too."""
    names = ("sd", "t5", "text_layer", "ella", "ella_heads", "sur", "sur_mode", "dtype", "mode",
             "steps", "guidance", "seed", "size", "token_length", "negative_prompt", "scheduler",
             "upsample_captions")  # fmt: skip
    settings = {name: getattr(args, name) for name in names}
    settings = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in settings.items()}
    for name, method in (("ella", "ella"), ("sur", "sur")):
        if settings[name] is not None:
            checkpoint = checkpoint_in(settings[name], method)
            files = [checkpoint] if checkpoint.is_file() else sorted(checkpoint.iterdir())
            versions = [storage.version(f) for f in files if f.is_file()]
            settings[f"{name}_version"] = ";".join(versions)
    return settings


def _check_resumable(out: epath.Path, settings: dict, overwrite: bool) -> None:
    """A DPG-Bench output is resumed only when its grids were drawn with `settings`;
    `overwrite`: its grids are removed (the folder stays) and drawn again."""
    if overwrite:
        _check_replaceable(out, overwrite)
        for entry in out.iterdir() if out.exists() else ():
            if entry.is_dir():
                entry.rmtree()
            else:
                entry.unlink()
        return
    if not out.exists() or not any(out.iterdir()):
        return
    saved_path = out / SETTINGS_FILE
    if not saved_path.is_file():
        raise UsageError(
            f"--out {out}: holds files but no {SETTINGS_FILE} (not a DPG-Bench output of this "
            "command): use a new folder, or --overwrite to replace it"
        )
    saved = read_json(saved_path)
    changes = [f"{k} {saved.get(k)!r} -> {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if changes:
        raise UsageError(
            f"--out {out}: its grids were drawn with other settings ({'; '.join(changes)}): use "
            "a new folder, or --overwrite to draw them all again"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ella_jax.generate",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models = parser.add_argument_group("models")
    models.add_argument(
        "--sd",
        type=storage.path_argument,
        required=True,
        metavar="DIR",
        help="diffusers Stable Diffusion 1.5 or SDXL folder",
    )
    models.add_argument(
        "--t5",
        type=storage.path_argument,
        default=None,
        metavar="DIR",
        help="ELLA's text model: a Hugging Face T5 folder (flan-t5-xl) or decoder-only LLM "
        "folder (Llama, Mistral, Qwen2); needed by the ELLA modes",
    )
    models.add_argument(
        "--text-layer",
        type=natural_int,
        default=None,
        metavar="K",
        help="the LLM's hidden-state entry the connector was trained on (transformers' "
        "numbering; default: the run's config.text_encoder.layer for a run's export, else the "
        "last hidden state)",
    )
    models.add_argument(
        "--ella",
        type=storage.path_argument,
        default=None,
        metavar="PATH",
        help="official ELLA .safetensors (ella-sd1.5-tsc-t5xl), a converted directory, or a "
        "training run's --workdir (its ella.safetensors); needed by the ELLA modes. A run's "
        "export brings the run's settings: heads, token length, text layer",
    )
    models.add_argument(
        "--sur",
        type=storage.path_argument,
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
        type=positive_int,
        metavar="N",
        default=None,
        help="ELLA attention heads, for an official file that stores none (this project's "
        "exports carry them; 8 for the released shapes); one that contradicts them is an error",
    )
    models.add_argument(
        "--force-text-model",
        action="store_true",
        help="use --t5 although the connector's run trained on a text model of another "
        "architecture (its export records which; refused without this flag)",
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
        type=storage.path_argument,
        metavar="FILE",
        help="text file, one prompt per line (blank lines skipped)",
    )
    sources.add_argument(
        "--dpg-bench",
        type=storage.path_argument,
        metavar="FILE",
        help="DPG-Bench prompts: its dpg_bench.csv, or id<TAB>prompt lines (e.g. "
        "data/dpg_bench_prompts.tsv)",
    )
    source.add_argument(
        "--limit", type=positive_int, default=None, metavar="N", help="only the first N prompts"
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
        "--out",
        type=storage.path_argument,
        required=True,
        metavar="DIR",
        help="output folder: new or empty (a DPG-Bench one drawn with the same settings "
        "resumes); written whole or not at all, except DPG-Bench's, grid by grid",
    )
    sampling.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a --out that holds an earlier output of this command (PNG files and "
        "settings.json only; another run's, or DPG-Bench grids drawn with other settings)",
    )
    sampling.add_argument(
        "--steps",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"sampler steps (default: the connector's run's config.sample_steps, else "
        f"{DEFAULT_STEPS})",
    )
    sampling.add_argument(
        "--guidance",
        type=finite_float,
        default=None,
        metavar="SCALE",
        help="classifier-free guidance (default: the connector's run's config.sample_guidance, "
        f"else {DEFAULT_GUIDANCE})",
    )
    sampling.add_argument(
        "--seed",
        type=natural_int,
        default=0,
        metavar="SEED",
        help="seed of the first image; image i uses SEED + i (default: 0)",
    )
    sampling.add_argument(
        "--size",
        type=positive_int,
        default=None,
        metavar="PIXELS",
        help="image height and width in pixels (default: the UNet's sample_size times the "
        "VAE's scale factor, as diffusers: 512 for SD 1.5, 1024 for SDXL)",
    )
    sampling.add_argument(
        "--token-length",
        choices=("fixed", "flexible"),
        default=None,
        help="T5 tokens: 'fixed' pads and truncates to 128 as ELLA's reference inference; "
        "'flexible' keeps each prompt's own tokens and masks the padding (default: what the "
        "connector's run trained with, read from the config.json beside its export, where "
        "one that contradicts it is an error; else fixed)",
    )
    sampling.add_argument(
        "--batch-size",
        type=positive_int,
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
        choices=tuple(SCHEDULER_FLAGS.values()),
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
        with _sigterm_interrupts():
            print(_run(args))
    except (UsageError, CheckpointError, PluginError, OSError) as e:
        return error_exit(e)
    except KeyboardInterrupt:
        print("interrupted: no output was left half-written", file=sys.stderr)
        return 130
    return 0


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a job scheduler's, `timeout`'s) unwinds as Ctrl-C does: staged outputs go."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can be set from the main thread only
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
