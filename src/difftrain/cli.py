"""The `difftrain` command: parses arguments, calls one function of the Python API, prints.

Errors the user can fix (config, data, checkpoint, model path) print one message and exit
with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from difftrain.errors import DifftrainError


def _whole(low: int, high: int | None = None):
    """An argparse type: a whole number from `low` (to `high`), refused with the bound it misses."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value}: give {low}" + (f" to {high}" if high is not None else
                                                                       " or more"))
        return value

    parse.__name__ = "number"
    return parse


def _finite(text: str) -> float:
    """An argparse type: a float that is a number (nan and inf made black images and NaN weights)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: give a finite number")
    return value


_finite.__name__ = "number"


def _caption_suffix(text: str) -> str:
    from difftrain.config import caption_suffix

    try:
        return caption_suffix(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
_SEED = _whole(-1, 2**63 - 1)  # -1: a random one (generate); torch's generators take 64 bits


def _train(args: argparse.Namespace) -> int:
    from difftrain.config import load_config

    config = load_config(args.config, args.set)  # before the trainer's imports (seconds): a bad key is said at once
    from difftrain.data.sources import check_local_path

    check_local_path(config.data.source, config.data.path, config.data.image_key, config.data.caption_key)  # so too
    from difftrain.training.trainer import train

    train(config, resume=args.resume, progress=not args.no_progress, allow_data_change=args.allow_data_change,
          started=args.started)
    return 0


def _control_units(args: argparse.Namespace) -> list:
    """One unit per --controlnet, paired in order with --control-image; the other lists give one value for
    every unit or one per unit. With --from-png, a setting not given is the PNG's unit's, where the PNG has as
    many units (its files named anew: another tool's PNG names none difftrain can find)."""
    from difftrain.generate.controlnet import ControlUnit, recorded_units
    from difftrain.generate.infotext import parse_infotext, read_png_infotext
    from difftrain.generate.text2image import parse_lora_arg

    # PATH[:SCALE], the --lora syntax; no scale: the one a difftrain run's network was trained at, else 1
    models = [parse_lora_arg(item, default=None) for item in args.controlnet or []]
    images = args.control_image or []
    if len(images) == len(models) + 1:  # the first image is for the model's own ControlNet (a ControlNet run's)
        models.insert(0, (None, None))
    if len(images) != len(models):
        raise DifftrainError(f"{len(models)} --controlnet and {len(images)} --control-image: give one image per "
                             "ControlNet, in the same order (and one more first for a ControlNet model's own)")
    recorded = recorded_units(parse_infotext(read_png_infotext(args.from_png))[2]) if args.from_png else []
    if recorded and len(recorded) != len(models):
        print(f"warning: {args.from_png} records {len(recorded)} ControlNet unit(s) and {len(models)} are given: "
              "their settings are not taken from it", file=sys.stderr)
    recorded = recorded if len(recorded) == len(models) else []
    models = [(path, recorded[i].scale if scale is None and recorded else scale) for i, (path, scale) in
              enumerate(models)]

    def per_unit(field: str, default, flag: str):
        values = getattr(args, flag[2:].replace("-", "_"))
        if not values and recorded:
            return [getattr(unit, field) for unit in recorded]
        values = values or [default]
        if len(values) not in (1, len(models)):
            raise DifftrainError(f"{flag}: give one value for all {len(models)} ControlNets or one for each")
        return values * len(models) if len(values) == 1 else values

    columns = zip(models, images, per_unit("preprocess", None, "--preprocess"),
                  per_unit("start", 0.0, "--control-start"), per_unit("end", 1.0, "--control-end"),
                  per_unit("resize", "crop", "--control-resize"), per_unit("mode", "balanced", "--control-mode"),
                  per_unit("processor_res", None, "--processor-res"), per_unit("low_threshold", None, "--canny-low"),
                  per_unit("high_threshold", None, "--canny-high"))
    # (no --preprocess: the ControlNet's own, when it is a difftrain run's, else none)
    return [ControlUnit(model=path, image=image, scale=scale, preprocess=preprocess,
                        start=start, end=end, low_threshold=low, high_threshold=high,
                        resize=resize, mode=mode, processor_res=resolution)
            for (path, scale), image, preprocess, start, end, resize, mode, resolution, low, high in columns]


def _sample(args: argparse.Namespace) -> int:
    from difftrain.sampling.schedulers import CORE_SCHEDULERS

    if args.list_schedulers:
        print("\n".join(CORE_SCHEDULERS) + "\n(these and A1111's sampler names: difftrain generate --list-schedulers)")
        return 0
    if not args.model:
        raise DifftrainError("sample: give a run folder or a diffusers model folder")
    out = Path(args.out)
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp") or out.is_dir():
        raise DifftrainError(f"--out {out}: the grid is one image file; give a .png, .jpg or .webp name")
    from difftrain.generate.unconditional import sample_grid, scheduler_sheet

    if args.scheduler == "all":
        _, drawn = scheduler_sheet(args.model, args.num, args.steps, args.seed, out, use_ema=not args.no_ema,
                                   classes=args.classes, guidance_scale=args.cfg)
        left = [name for name in CORE_SCHEDULERS if name not in drawn]
        print(f"wrote {out} (one row per sampler: {', '.join(drawn)}; {args.steps} steps, seed {args.seed})"
              + (f"; not {', '.join(left)}, which cannot sample this model's prediction type" if left else ""))
        return 0
    _, images = sample_grid(args.model, args.num, args.scheduler, args.steps, args.seed, out, use_ema=not args.no_ema,
                            classes=args.classes, guidance_scale=args.cfg)
    drawn = [image.info["class"] for image in images if "class" in image.info]
    classes = f"; classes in turn: {', '.join(dict.fromkeys(drawn))}" if drawn else ""
    print(f"wrote {out} ({args.num} images, {args.scheduler}, {args.steps} steps, seed {args.seed}{classes})")
    return 0


def _source_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """PATH OUT and the options naming what PATH holds, for the commands that read any source."""
    parser.add_argument("path", help="what to read: a folder, a jsonl file, a laion filelist, tar(s), or for "
                        "--source hf a save_to_disk folder, parquet file(s) or glob, or a Hub id")
    parser.add_argument("out", help=out_help)
    parser.add_argument("--source", default="folder", choices=["folder", "jsonl", "laion", "webdataset", "hf"])
    parser.add_argument("--image-key", default="image", help="jsonl: key of the image path; hf: the image column")
    parser.add_argument("--caption-key", default="caption",
                        help="jsonl: key of the caption; hf: the caption column; '' reads no captions (any source)")
    parser.add_argument("--split", default="train", help="hf: the split to read")
    parser.add_argument("--hf-config", help="hf: the Hub data set's configuration (subset) name")
    parser.add_argument("--revision", help="hf: the Hub data set's branch, tag or commit")
    parser.add_argument("--streaming", action="store_true", help="hf: stream the data instead of copying it first")


def _open_source(args: argparse.Namespace, progress: bool = True):
    from difftrain.data.hf import HFOptions
    from difftrain.data.setting_names import COMMAND_ARGUMENTS
    from difftrain.data.sources import open_source

    # (--caption-key '' reads no captions, as a run's data.captions: none)
    hf = HFOptions(args.image_key, args.caption_key or None, args.split, args.hf_config, args.revision, args.streaming)
    return open_source(args.source, args.path, image_key=args.image_key, caption_key=args.caption_key,
                       captions="auto" if args.caption_key else "none", progress=progress, hf=hf,
                       names=COMMAND_ARGUMENTS)


SHOWN = 100  # skipped records a data command names one by one

def _data_build(args: argparse.Namespace) -> int:
    from difftrain.data.shards import build_shards, export_folder, refuse_occupied

    refuse_occupied(Path(args.out))  # before the source is read: indexing a large one takes minutes
    source = _open_source(args)
    # each named: a build writes no data report to look them up in
    for problems, what in ((source.skipped, "records skipped"),
                           (source.notes, "caption problems (no record left out)")):
        if problems:
            print(f"{len(problems)} {what} while reading {args.path}:")
            for where, reason in problems[:SHOWN]:
                print(f"  {where}: {reason}")
            if len(problems) > SHOWN:
                print(f"  ... and {len(problems) - SHOWN} more")
    skipped: list[str] = []
    if args.format == "folder":
        out = export_folder(source, args.out, skipped=skipped)
    else:
        out = build_shards(source, args.out, args.format, records_per_shard=args.per_shard, gzip=not args.no_gzip,
                           skipped=skipped)
    for reason in skipped[:SHOWN]:
        print(f"  not written: {reason}")
    unwritten = f"; {len(skipped)} not written" if skipped else ""
    print(f"wrote {len(source) - len(skipped)} records from {source.description.replace(' (see the data report)', '')} "
          f"to {out} ({args.format}){unwritten}")
    return 0


def _data_index(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from difftrain.data.setting_names import COMMAND_ARGUMENTS
    from difftrain.data.sources import LaionSource, WebDatasetSource

    kind = {"laion": LaionSource, "webdataset": WebDatasetSource}[args.format]
    shards, unlisted = kind.list_shards(Path(args.path), COMMAND_ARGUMENTS)
    for label, problem in unlisted:
        print(f"not indexed: {label}: {problem}")
    local = [Path(shard) for _, shard in shards if not isinstance(shard, str)]
    if len(local) < len(shards):
        raise DifftrainError(f"{args.path} lists shards by URL: index them where they are written, then upload "
                             "each .index.json beside its shard")
    import tarfile

    from difftrain.data.sources import TAR_SUFFIXES

    # Read in the other format, a shard is all unreadable records, and its good index would be written over. A
    # .tar that is no tar is a damaged one (an empty download, an error page): indexed as the run reads it.
    tars = {shard: tarfile.is_tarfile(shard) for shard in local}
    other = next((shard for shard, tar in tars.items() if tar != (args.format == "webdataset")
                  and not shard.name.endswith(TAR_SUFFIXES)), None)
    if other is not None:
        tar, fits = ("not a tar", "laion") if args.format == "webdataset" else ("a tar", "webdataset")
        raise DifftrainError(f"{other}: {tar}, so no {args.format} shard; give --format {fits}")
    for shard in tqdm(local, desc="indexing shards", unit="shard", disable=args.no_progress):
        kind.write_sidecar(shard)
        if not tars[shard] and args.format == "webdataset":
            print(f"{shard}: not readable as a tar (empty or damaged): indexed as holding no sample, as a run "
                  "reads it; download it again, then index again")
    print(f"wrote {len(local)} index file(s) beside the shards of {args.path}: a run opens them without reading them")
    return 0


def _data_curate(args: argparse.Namespace) -> int:
    from difftrain.curate.items import CurateOptions
    from difftrain.curate.pipeline import curate, shard_slice
    from difftrain.curate.report import counts

    options = CurateOptions(
        dedupe=tuple(k for k in args.dedupe.split(",") if k), phash_distance=args.phash_distance,
        clip_duplicate=args.clip_duplicate, keep=args.keep, min_size=args.min_size, max_aspect=args.max_aspect,
        min_file_size=args.min_file_size, max_file_size=args.max_file_size, clip_model=args.clip,
        clip_min=args.clip_min, aesthetic=args.aesthetic, aesthetic_min=args.aesthetic_min,
        captioner=args.caption, caption_mode=args.caption_mode, caption_prompt=args.caption_prompt,
        caption_prefix=args.caption_prefix, caption_max_tokens=args.caption_max_tokens, format=args.format,
        per_shard=args.per_shard, batch_size=args.batch_size, device=args.device, force=args.force,
        shard=_shard_arg(args.shard), progress=not args.no_progress,
        report_dir=Path(args.report) if args.report else None,
        **({"cache_dir": Path(args.cache_dir)} if args.cache_dir else {}),
    )
    source = _open_source(args, progress=not args.no_progress)
    result = curate(source, args.out, options, inputs=(args.path,))
    if result is None:  # an accelerate rank other than 0: rank 0 reports
        return 0
    summary = counts(result.items)
    dropped = ", ".join(f"{n} {step}" for step, n in summary["dropped"].items()) or "none"
    if options.shard:
        measured = shard_slice(len(source), options.shard)
        where = f"cached features for records {measured.start}-{measured.stop - 1}"
    else:
        where = f"wrote {summary['kept']} records to {result.out}; report in {result.report_dir}"
    print(f"{summary['records']} records: {summary['kept']} kept, dropped: {dropped}. {where}")
    if source.notes and not options.shard:
        print(f"{len(source.notes)} caption problems while reading {args.path} (no record left out; listed in the "
              "report's report.json), e.g. " + ": ".join(source.notes[0]))
    return 0


def _shard_arg(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise DifftrainError(f"--shard {text}: give it as i/N, e.g. 0/4") from None
    return index, count


def _data_download(args: argparse.Namespace) -> int:
    from difftrain.data.download import REPORT_NAME, DownloadOptions, download, merge, summary_lines
    from difftrain.data.sources import LIST_NAME

    out = Path(args.out)
    if args.merge_only:
        report = merge(out)
    else:
        options = DownloadOptions(
            url_col=args.url_col, caption_col=args.caption_col, format=args.format, per_shard=args.per_shard,
            gzip=not args.no_gzip, workers=args.workers, timeout=args.timeout, retries=args.retries,
            max_bytes=args.max_bytes, respect_opt_out=not args.ignore_opt_out, resize=args.resize,
            resize_mode=args.resize_mode, upscale=args.upscale, encode_format=args.encode_format,
            encode_quality=args.encode_quality, max_pixels=args.max_pixels, shard=_shard_arg(args.shard),
            allow_private=args.allow_private,
            progress=not args.quiet,
        )
        result = download(args.urls, out, options)
        whole = result.report is not None and result.report["rows"] == result.run["rows"]
        if result.shards and not whole:  # part of the download: say what this run did, then the whole
            print(f"this run, {len(result.shards)} shard(s): " + "; ".join(summary_lines(result.run)))
        if result.report is None:
            print(f"{result.done} of {result.total_shards} shards are done; the process that finishes the last one "
                  f"writes {LIST_NAME} (or run this command again with --merge-only)")
            return 0
        report = result.report
    print("\n".join(summary_lines(report)))
    files = len(report["files"])
    print(f"wrote {out / LIST_NAME} ({files} {report['plan']['format']} shard{'s' if files != 1 else ''}) and "
          f"{out / REPORT_NAME}")
    return 0


def _new_folder(path: str | Path, what: str) -> None:
    """Refuse to write `what` over a file or into a folder holding anything (the writers replace it whole)."""
    from difftrain.atomic import occupied

    path = Path(path)
    if occupied(path):
        raise DifftrainError(f"{path} exists{'' if path.is_dir() else ' (a file)'}: {what} would replace it; give a "
                             "new folder")


def _model_tiny_sd(args: argparse.Namespace) -> int:
    from difftrain.models.tiny_sd import write_tiny_sd

    _new_folder(args.out, "the tiny model")
    out = write_tiny_sd(args.out, seed=args.seed)
    print(f"wrote a tiny random-weight Stable Diffusion pipeline (diffusers format) to {out}")
    return 0


GENERATE_FIELDS = {  # argparse dest -> GenerateOptions field
    "prompt": "prompt", "negative_prompt": "negative_prompt", "steps": "steps", "scheduler": "scheduler",
    "cfg": "guidance_scale", "seed": "seed", "width": "width", "height": "height", "batch_size": "batch_size",
    "n_iter": "n_iter", "lora_dir": "lora_dir", "upscaler_dir": "upscaler_dir", "clip_skip": "clip_skip",
    "precision": "precision",
    "attention_slicing": "attention_slicing", "vae_tiling": "vae_tiling", "vae_slicing": "vae_slicing",
    "cpu_offload": "cpu_offload", "compile": "compile", "compile_mode": "compile_mode",
    "channels_last": "channels_last", "fuse_qkv": "fuse_qkv",
    "init_image": "init_image", "strength": "strength", "resize_mode": "resize_mode", "config": "config",
    "backend": "backend",
    "mask": "mask", "mask_blur": "mask_blur", "masked_content": "masked_content", "invert_mask": "invert_mask",
    "only_masked": "only_masked", "only_masked_padding": "only_masked_padding",
    "provider": "provider", "provider_fallback": "provider_fallback", "deepcache": "deepcache", "device": "device",
    "variation_seed": "variation_seed", "variation_strength": "variation_strength", "ensd": "ensd", "eta": "eta",
}


SOFT_INPAINTING_FLAGS = [  # SoftInpainting's fields (--soft-schedule-bias ...) and what they do (A1111's help)
    ("schedule_bias", "when the original is preserved while denoising: above 1 early, below 1 late (default 1)"),
    ("preservation_strength", "how strongly partly masked content keeps the original (default 0.5)"),
    ("transition_contrast_boost", "the contrast kept where the two blend, 1 to 32 (default 4)"),
    ("mask_influence", "how much the mask biases the difference threshold, 0 to 1 (default 0)"),
    ("difference_threshold", "how much a region may change and still show the original blended in (default 0.5)"),
    ("difference_contrast", "how sharp the change from blended to not blended is (default 2)"),
]


def _soft_inpainting(args: argparse.Namespace) -> dict:
    """The --soft-* settings given (SoftInpainting's field names)."""
    return {setting: getattr(args, f"soft_{setting}") for setting, _ in SOFT_INPAINTING_FLAGS
            if getattr(args, f"soft_{setting}") is not None}


def _generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from difftrain.generate.hires import Hires
    from difftrain.generate.text2image import GenerateOptions, generate, options_from_png, parse_lora_arg, with_seed

    if args.list_schedulers:
        from difftrain.sampling.schedulers import list_schedulers

        for display, short, what in list_schedulers():
            print(f"{display:24s} {short:22s} {what}")
        return 0
    if not args.model:
        raise DifftrainError("generate: give a model (run folder, diffusers folder, hub id or .safetensors file)")
    _out_folder(args.out)
    given = {field: getattr(args, dest) for dest, field in GENERATE_FIELDS.items() if getattr(args, dest) is not None}
    if args.lora:
        given["loras"] = [parse_lora_arg(item) for item in args.lora]
    if args.embedding:
        given["embeddings"] = list(args.embedding)
    if args.no_ema:
        given["use_ema"] = False
    if args.seed_resize_from is not None:
        given["seed_resize_from"] = _size_flag("--seed-resize-from", args.seed_resize_from, " (e.g. 512x512)")
    if not (args.controlnet or args.control_image) and (args.preprocess or args.control_start or args.control_end
                                                         or args.control_resize or args.control_mode
                                                         or args.processor_res or args.canny_low
                                                         or args.canny_high):
        raise DifftrainError("--preprocess, --control-start, --control-end, --control-resize, --control-mode, "
                             "--processor-res and --canny-low/--canny-high apply to ControlNets: give --controlnet "
                             "and --control-image too (a "
                             "ControlNet model needs --control-image alone)")
    if args.controlnet or args.control_image:
        given["controlnets"] = _control_units(args)
    hires = _hires_flags(args)
    turns_on = "scale" in hires or "resize" in hires
    if hires and not (turns_on or args.from_png):
        raise DifftrainError("--hires-upscaler, --hires-steps, --hires-sampler, --hires-checkpoint and "
                             "--hires-(negative-)prompt set the hires fix: give --hires-scale or --hires-resize too")
    if args.strength is not None and not (args.init_image or args.from_png or turns_on):
        raise DifftrainError("--strength applies to img2img and the hires fix: give --init-image or --hires-scale too")
    inpainting = [flag for flag in ("mask_blur", "masked_content", "invert_mask", "only_masked", "only_masked_padding",
                                    "soft_inpainting") if getattr(args, flag) is not None]
    if inpainting and not (args.mask or args.from_png):
        raise DifftrainError(f"--{inpainting[0].replace('_', '-')} applies to inpainting: give --mask (and "
                             "--init-image) too")
    soft = _soft_inpainting(args)
    if soft and not (args.soft_inpainting or args.from_png):
        raise DifftrainError(f"--soft-{next(iter(soft)).replace('_', '-')} sets soft inpainting: give "
                             "--soft-inpainting too")
    if args.soft_inpainting:
        from difftrain.sampling.soft_inpaint import SoftInpainting

        given["soft_inpainting"] = SoftInpainting(**soft)  # (with --from-png: instead of the PNG's)
    if turns_on and not args.from_png:
        given["hires"] = Hires(**hires)
    if args.from_png:
        options = options_from_png(args.from_png, **given)
        if hires:  # each flag given replaces the PNG's own setting
            if options.hires is None and not turns_on:
                raise DifftrainError(f"{args.from_png} has no hires fix to change (or it is left out with "
                                     "--init-image and --controlnet): give --hires-scale or --hires-resize to add one")
            base = options.hires or Hires()
            if "scale" in hires and "resize" not in hires:
                base = replace(base, resize=(0, 0))  # (a resize wins over a scale)
            options = replace(options, hires=replace(base, **hires))
        if soft and not args.soft_inpainting:  # each flag given replaces the PNG's own setting
            if options.soft_inpainting is None:
                raise DifftrainError(f"{args.from_png} was not soft-inpainted: give --soft-inpainting to add it")
            options = replace(options, soft_inpainting=replace(options.soft_inpainting, **soft))
    elif "prompt" not in given:
        raise DifftrainError("generate: give --prompt (or --from-png IMAGE to repeat an image's generation)")
    else:
        options = GenerateOptions(**given)
    if args.guess_mode:  # --control-mode control for every unit, the command line's or the PNG's
        if not options.controlnets:
            raise DifftrainError("--guess-mode applies to ControlNets: give --controlnet and --control-image too")
        if set(args.control_mode or ["control"]) != {"control"}:
            raise DifftrainError("--guess-mode is --control-mode control for every ControlNet: give one or the other")
        options = replace(options, controlnets=[replace(unit, mode="control") for unit in options.controlnets])
    options = with_seed(options)  # here, so the seeds printed below are the ones drawn
    paths = generate(args.model, options, args.out, progress=not args.no_progress)
    if options.compile:
        from difftrain.generate.speed import compile_report

        print(compile_report())
    last = len(paths) - 1
    seeds = (f"seed {options.seed}, variation seeds {options.variation_seed}..{options.variation_seed + last} at "
             f"{options.variation_strength:g}" if options.variation_strength else
             f"seeds {options.seed}..{options.seed + last}")
    print(f"wrote {len(paths)} image(s) to {args.out} ({options.scheduler}, {options.steps} steps, {seeds}); each "
          "PNG carries its parameters (--from-png repeats it)")
    return 0


def _hires_flags(args: argparse.Namespace) -> dict:
    """The hires fix settings given on the command line (generate.hires.Hires fields); --hires-scale or
    --hires-resize turns it on."""
    given = {field: value for field, value in (("scale", args.hires_scale), ("upscaler", args.hires_upscaler),
                                               ("steps", args.hires_steps), ("sampler", args.hires_sampler),
                                               ("prompt", args.hires_prompt), ("checkpoint", args.hires_checkpoint),
                                               ("negative_prompt", args.hires_negative_prompt))
             if value is not None}
    if args.hires_resize is not None:
        given["resize"] = _size_flag("--hires-resize", args.hires_resize,
                                     ", 0 for a side that follows the other (e.g. 1024x0)")
    return given


def _size_flag(flag: str, value: str, hint: str) -> tuple[int, int]:
    """A WIDTHxHEIGHT flag's (width, height), or an error that names the flag and says how to write it."""
    from difftrain.generate.text2image import parse_size

    if (size := parse_size(value)) is None:
        raise DifftrainError(f"{flag} {value}: give WIDTHxHEIGHT in pixels{hint}")
    return size


def _out_folder(out: str | None) -> None:
    """--out names a folder (generate's images, eval's report): a file there is refused before any work."""
    if out and Path(out).exists() and not Path(out).is_dir():
        raise DifftrainError(f"--out {out} is a file; give a folder for the output")


def _eval(args: argparse.Namespace) -> int:
    _out_folder(args.out)
    if args.weights_dir and not Path(args.weights_dir).is_dir():  # (ignored, and then a download was tried)
        raise DifftrainError(f"--weights-dir {args.weights_dir}: no such folder")
    from difftrain.evaluate.run import EvalOptions, evaluate
    from difftrain.evaluate.scores import Networks

    networks = Networks(weights_dir=args.weights_dir, inception=args.inception_weights, alexnet=args.alexnet_weights,
                        lpips=args.lpips_weights, clip_model=args.clip_model, device=args.device,
                        batch_size=args.feature_batch_size)
    options = EvalOptions(
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None,
        reference=args.reference, reference_source=args.reference_source, reference_max=args.reference_max,
        reference_image_key=args.reference_image_key, reference_caption_key=args.reference_caption_key,
        num_images=args.num_images, images_per_prompt=args.images_per_prompt, prompt=args.prompt,
        prompts_file=args.prompts, negative_prompt=args.negative_prompt or "", seed=args.seed,
        batch_size=args.batch_size, scheduler=args.scheduler, steps=args.steps, guidance_scale=args.cfg,
        width=args.width, height=args.height, use_ema=not args.no_ema, precision=args.precision, size=args.size,
        cache_dir=args.cache_dir, save_reference=args.save_reference, networks=networks,
    )
    result = evaluate(args.target, options, args.out, progress=not args.no_progress)
    print("\n".join(result.summary))
    return 0


def _lora_merge(args: argparse.Namespace) -> int:
    from difftrain.generate.merge import merge_loras

    out = merge_loras(args.base, [(args.lora, args.scale)], args.out, progress=not args.no_progress)
    print(f"wrote {out}: {args.base} with {args.lora} baked in at scale {args.scale}")
    return 0


def _lora_convert(args: argparse.Namespace) -> int:
    from difftrain.models.lora_files import convert_lora

    if Path(args.dst).suffix != ".safetensors":
        raise DifftrainError(f"{args.dst}: a LoRA file is written as .safetensors; give the name with it")
    if Path(args.dst).exists() and Path(args.dst).resolve() == Path(args.src).resolve():
        raise DifftrainError(f"{args.dst} is the file being converted; write the {args.to} keys to another file")
    if Path(args.dst).is_dir():
        raise DifftrainError(f"{args.dst}: a folder; give the name of the file to write")
    out = convert_lora(args.src, args.dst, to=args.to)
    print(f"wrote {out} ({args.to} keys)")
    return 0


def _data_shapes(args: argparse.Namespace) -> int:
    from difftrain.data.shapes import write_shapes_dataset

    _new_folder(args.out, "the shapes set")
    out = write_shapes_dataset(args.out, args.num, args.size, args.seed, masks=args.conditioning == "mask")
    extra = " with their masks in conditioning/" if args.conditioning else ""
    print(f"wrote {args.num} images of {args.size}x{args.size} px{extra} and metadata.jsonl to {out}")
    return 0


SERVE_FOLDERS = {"--lora-dir": "models/lora", "--embeddings-dir": "models/embeddings",
                 "--controlnet-dir": "models/controlnet", "--upscaler-dir": "models/upscalers"}  # A1111's layout


def _upscale(args: argparse.Namespace) -> int:
    from difftrain.errors import UpscalerError
    from difftrain.generate.text2image import resolve_device
    from difftrain.generate.upscale import ImageUpscaler, upscale_files

    _out_folder(args.out)
    if args.resize and args.scale is not None:  # (--scale was ignored: one or the other, as A1111's tabs)
        raise DifftrainError("--scale and --resize: give one or the other")
    if args.no_crop and not args.resize:
        raise DifftrainError("--no-crop applies to --resize (the size is covered, not cut to): give --resize too")
    size = _size_flag("--resize", args.resize, " (e.g. 1024x1024)") if args.resize else None
    try:
        device = resolve_device(args.device)
        first = ImageUpscaler.find(args.upscaler, args.upscaler_dir, device)
        second = ImageUpscaler.find(args.upscaler_2, args.upscaler_dir, device) if args.upscaler_2 else None
        written, skipped = upscale_files(args.images, args.out, first, progress=not args.no_progress,
                                         scale=args.scale, size=size, crop=not args.no_crop, second=second,
                                         visibility=args.upscaler_2_visibility, tile=args.tile)
    except UpscalerError as reason:  # (its messages start with the setting: upscaler, scale, resize or tile)
        raise DifftrainError(f"--{reason}") from None
    for image, reason in skipped:
        print(f"skipped {image}: {reason}", file=sys.stderr)
    print(f"wrote {len(written)} image(s) to {args.out}" + (f"; {len(skipped)} skipped" if skipped else ""))
    return 0 if written else 2


def _serve(args: argparse.Namespace) -> int:
    from difftrain.serve.app import LOOPBACK, ServeSettings, create_app
    from difftrain.serve.requests import Limits

    users = []
    for pair in (args.api_auth or "").split(","):
        if pair:
            user, sep, password = pair.partition(":")
            if not sep or not user or not password:
                raise DifftrainError(f"--api-auth {pair!r}: expected user:password[,user:password]")
            users.append((user, password))
    if args.host not in LOOPBACK and not (users or args.token) and not args.insecure:
        raise DifftrainError(f"--host {args.host} listens beyond this machine: set --api-auth or --token, or "
                             "--insecure if the network is yours alone")
    from difftrain.models.sd import check_exists

    for model in args.models:
        check_exists("model", model)
    for flag, folder in (("--lora-dir", args.lora_dir), ("--controlnet-dir", args.controlnet_dir),
                         ("--embeddings-dir", args.embeddings_dir), ("--upscaler-dir", args.upscaler_dir)):
        # (the defaults, A1111's models/ folders, may be absent: nothing of that kind is served then)
        if folder != SERVE_FOLDERS[flag] and not Path(folder).is_dir():
            raise DifftrainError(f"{flag} {folder}: no such folder")
    limits = Limits(max_width=args.max_size, max_height=args.max_size, max_steps=args.max_steps,
                    max_batch_size=args.max_batch_size, max_n_iter=args.max_n_iter, max_queue=args.max_queue)
    # Bound here, before any model loads: a port in use is said at once, and --port 0's port is known to print.
    listening = _listening_socket(args.host, args.port)
    port = listening.getsockname()[1]
    settings = ServeSettings(models=args.models, host=args.host, port=port, users=users, token=args.token,
                             lora_dir=args.lora_dir, controlnet_dir=args.controlnet_dir,
                             embeddings_dir=args.embeddings_dir, upscaler_dir=args.upscaler_dir, device=args.device,
                             precision=args.precision, models_in_memory=args.models_in_memory, limits=limits,
                             allowed_hosts=args.allow_host or [])
    app = create_app(settings)
    import uvicorn

    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {', '.join(app.state.engine.models)} on http://{host}:{port}/sdapi/v1 "
          f"({'credentials required' if settings.protected else 'no authentication'})", flush=True)
    # Ctrl+C: clients waiting on a job hold their connections; after 5 s they are cut and their jobs cancelled.
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[listening])
    except KeyboardInterrupt:  # Ctrl+C is how a server is stopped (uvicorn.run swallows it too)
        pass
    return 0


def _listening_socket(host: str, port: int):
    """A TCP socket listening on host:port (0: any free port), bound as uvicorn's Config.bind_socket binds one (IPv6
    for an address with a colon, else IPv4: `localhost` is 127.0.0.1), and listening at once, so a second server
    started beside it is refused here rather than after loading its models."""
    import socket

    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listening.bind((host, port))
        listening.listen(2048)
    except OSError as error:
        listening.close()
        raise DifftrainError(f"--host {host} --port {port}: cannot listen there ({error.strerror or error}); "
                             "another server may hold the port: give another --port, or 0 for any free one") from None
    return listening


def _data_judge_shapes(args: argparse.Namespace) -> int:
    from difftrain.data.shapes_judge import judge_grid

    columns, _, rows = args.grid.partition("x")
    if not (columns.isdigit() and (rows or columns).isdigit() and int(columns) and int(rows or columns)):
        raise DifftrainError(f"--grid {args.grid}: give columns x rows, e.g. 4x4")
    from difftrain.data.images import BadImage, image_size_from_file, load_image

    try:
        load_image(args.image)
        width, height = image_size_from_file(args.image)
    except BadImage as reason:
        raise DifftrainError(f"{args.image}: {reason}") from None
    if width // int(columns) < 8 or height // int(rows or columns) < 8:
        raise DifftrainError(f"--grid {args.grid}: cells of {width // int(columns)}x{height // int(rows or columns)} "
                             f"px in a {width}x{height} image; give the grid's own columns x rows")
    verdicts = judge_grid(args.image, int(columns), int(rows or columns))
    for number, verdict in enumerate(verdicts, 1):
        print(f"  cell {number:2d}: {'clean  ' if verdict.clean else 'NOT OK '} {verdict.describe()}")
    clean = sum(v.clean for v in verdicts)
    print(f"{args.image}: {clean}/{len(verdicts)} cells are clean single-coloured shapes of the set")
    return 0 if clean >= args.min_clean else 1


def _export(args: argparse.Namespace) -> int:
    from difftrain.export.onnx import ExportOptions, export_onnx
    from difftrain.generate.text2image import parse_lora_arg

    gate = [flag for flag, given in (("--min-psnr", args.min_psnr is not None), ("--force", args.force),
                                     ("--gate-size", args.gate_size is not None), ("--gate-clip", args.gate_clip),
                                     ("--gate-steps", args.gate_steps is not None),
                                     ("--max-clip-drop", args.max_clip_drop is not None)) if given]
    if gate and not args.quantize:
        raise DifftrainError(f"{', '.join(gate)}: the int8 quality gate's settings; add --quantize int8, or leave "
                             "them out")
    if args.config and not Path(args.config).is_dir():
        raise DifftrainError(f"--config {args.config}: no such folder (a diffusers folder with the model's configs)")
    options = ExportOptions(precision=args.precision, quantize=args.quantize,
                            loras=[parse_lora_arg(item) for item in args.lora or ()], lora_scale=args.lora_scale,
                            embeddings=list(args.embedding or ()), controlnet=args.controlnet,
                            use_ema=not args.no_ema, config=args.config, opset=args.opset, exporter=args.exporter,
                            min_psnr=args.min_psnr, force=args.force,
                            gate_steps=args.gate_steps or ExportOptions.gate_steps,
                            gate_size=args.gate_size, gate_clip=args.gate_clip, max_clip_drop=args.max_clip_drop)
    out = export_onnx(args.model, args.out, options, progress=not args.no_progress)
    gate = json.loads((out / "difftrain.json").read_text())["export"].get("quality_gate")
    verdict = ""
    if gate:
        verdict = (f"; quality gate {'passed' if gate['passed'] else 'FAILED (written with --force)'}: PSNR to fp32 "
                   f"{gate['psnr_min']:.1f} dB at worst, {gate['psnr_mean']:.1f} mean, floor {gate['min_psnr']:.1f}")
        if "clip_drop" in gate:
            verdict += (f"; CLIP score {gate['clip_score_int8']:.2f} against fp32's {gate['clip_score_fp32']:.2f}, "
                        f"allowed drop {gate['max_clip_drop']:.2f}")
    print(f"wrote {out} (ONNX opset {options.resolved_opset}, {args.precision}{', int8 UNet' if args.quantize else ''}{verdict}); "
          f"difftrain generate {out} --prompt ... runs it on ONNX Runtime")
    return 0


def _checkpoint_consolidate(args: argparse.Namespace) -> int:
    from difftrain.training.sharding import consolidate

    written = consolidate(Path(args.checkpoint), Path(args.out) if args.out else None)
    print("wrote " + ", ".join(str(p) for p in written) + " (whole tensors, the layout of an unsharded checkpoint)")
    return 0


def _export_controlnet(args: argparse.Namespace) -> int:
    import torch
    from diffusers import ControlNetModel

    from difftrain.models.control import control_class, local_folder
    from difftrain.models.single_file import save_controlnet_single_file

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    src, out = local_folder(args.src), Path(args.out)
    if out.is_file() and src.is_dir() and out.resolve().parent == src.resolve():
        raise DifftrainError(f"{args.out} is a file of the ControlNet being exported ({src}): writing it would "
                             "destroy the model; give another path")
    where = src if src.is_dir() else args.src
    try:
        kind = control_class(where, args.src)
        net = ControlNetModel.from_pretrained(where) if kind == "ControlNetModel" else None
    except DifftrainError:
        raise
    except (OSError, ValueError) as exc:
        raise DifftrainError(f"{args.src}: not a diffusers ControlNet folder ({str(exc).splitlines()[0]})") from None
    if net is None:
        raise DifftrainError(f"{args.src} is a T2I-Adapter: export-controlnet writes ControlNets (A1111 and ComfyUI "
                             "load a T2I-Adapter's diffusers folder as it is)")
    out = save_controlnet_single_file(net, args.out, dtype=dtype)
    print(f"wrote {out} ({args.dtype}, control_model.* keys: A1111's ControlNet extension and ComfyUI load it)")
    return 0


def _data_check(args: argparse.Namespace) -> int:
    from difftrain.data.folder import scan_folder
    from difftrain.data.setting_names import COMMAND_ARGUMENTS

    scan = scan_folder(args.path, args.captions, args.caption_extension, names=COMMAND_ARGUMENTS)
    print("\n".join(scan.report_lines()))
    return 0


def _config_check(args: argparse.Namespace) -> int:
    from difftrain.config import load_config

    config = load_config(args.config, args.set)
    print(f"{args.config}: valid. Resolved config:\n")
    print(config.to_yaml())
    return 0


def build_parser() -> argparse.ArgumentParser:
    from difftrain.generate.hires import UPSCALERS  # (neither imports torch: --help stays instant)
    from difftrain.generate.speed import COMPILE_MODES

    parser = argparse.ArgumentParser(prog="difftrain", description="Train, sample and inspect diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="run config (YAML)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. training.max_steps=100")
    train.add_argument("--resume", metavar="latest|PATH", help="continue from the latest checkpoint or a checkpoint folder")
    train.add_argument("--allow-data-change", action="store_true",
                       help="resume although the data set differs from the one the checkpoint was trained on")
    train.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    train.set_defaults(run=_train)

    sample = commands.add_parser("sample", help="draw a grid of samples from a run or a diffusers folder")
    sample.add_argument("model", nargs="?", help="run folder or diffusers model folder")
    sample.add_argument("--num", type=_whole(1), default=16, help="number of images (default 16)")
    sample.add_argument("--scheduler", default="dpm++_2m", help="sampler name (see --list-schedulers), or 'all' for one row per sampler")
    sample.add_argument("--steps", type=_whole(1), default=25)
    sample.add_argument("--seed", type=_SEED, default=0)
    sample.add_argument("--out", default="grid.png")
    sample.add_argument("--no-ema", action="store_true", help="use the raw weights rather than the EMA ones")
    sample.add_argument("--class", dest="classes", action="append", metavar="NAME",
                        help="a class-conditional model: draw this class (repeat for several, in turn; default all)")
    sample.add_argument("--cfg", type=_finite,
                        help="a class-conditional model's guidance scale (default: its training previews')")
    sample.add_argument("--list-schedulers", action="store_true", help="print the sampler names and exit")
    sample.set_defaults(run=_sample)

    data = commands.add_parser("data", help="make or inspect data sets").add_subparsers(dest="data_command", required=True)
    shapes = data.add_parser("shapes", help="write the synthetic coloured-shapes set")
    shapes.add_argument("out")
    shapes.add_argument("--num", type=_whole(1), default=2400)
    shapes.add_argument("--size", type=_whole(8, 4096), default=32)
    shapes.add_argument("--seed", type=int, default=0)
    shapes.add_argument("--conditioning", choices=["mask"],
                        help="also write each shape's mask, named by a conditioning_image column (ControlNet data)")
    shapes.set_defaults(run=_data_shapes)
    judge = data.add_parser("judge-shapes", help="check a sample grid of a shapes model: one clean shape per cell?")
    judge.add_argument("image", help="a grid written by `difftrain sample`")
    judge.add_argument("--grid", default="4x4", help="columns x rows (default 4x4)")
    judge.add_argument("--min-clean", type=_whole(0), default=0, help="exit 1 when fewer cells are clean")
    judge.set_defaults(run=_data_judge_shapes)
    check = data.add_parser("check", help="scan an image folder and report usable, bad and uncaptioned files")
    check.add_argument("path")
    check.add_argument("--captions", default="auto", choices=["auto", "metadata", "txt", "none"])
    check.add_argument("--caption-extension", default=".txt", type=_caption_suffix)
    check.set_defaults(run=_data_check)

    build = data.add_parser("build", help="convert a folder, jsonl, laion parts or webdataset tars into shards, or back")
    _source_arguments(build, "output folder")
    build.add_argument("--format", default="laion", choices=["laion", "webdataset", "folder"])
    build.add_argument("--per-shard", type=_whole(1), default=1000, help="records per part/tar (default 1000)")
    build.add_argument("--no-gzip", action="store_true", help="laion parts as plain text instead of gzip")
    build.set_defaults(run=_data_build)

    index = data.add_parser("index", help="write the index beside laion parts or webdataset tars another tool wrote")
    index.add_argument("path", help="laion filelist (or its folder), webdataset folder, .tar or list of tars")
    index.add_argument("--format", required=True, choices=["laion", "webdataset"])
    index.add_argument("--no-progress", action="store_true")
    index.set_defaults(run=_data_index)

    down = data.add_parser("download", help="download a table of image URLs into laion parts or webdataset tars")
    down.add_argument("urls", help="parquet, csv, tsv or jsonl with a url and a caption column, or a .txt of URLs")
    down.add_argument("out", help="output folder; a re-run continues what is there")
    down.add_argument("--url-col", default="url")
    down.add_argument("--caption-col", default="caption", help="'' for no captions")
    down.add_argument("--format", default="webdataset", choices=["webdataset", "laion"])
    down.add_argument("--per-shard", type=_whole(1), default=1000, help="input rows per shard (default 1000)")
    down.add_argument("--no-gzip", action="store_true", help="laion parts as plain text instead of gzip")
    down.add_argument("--workers", type=int, default=16, help="download threads (default 16)")
    down.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default 10)")
    down.add_argument("--retries", type=int, default=2, help="after timeouts, connection errors, 5xx, 429 (default 2)")
    down.add_argument("--max-bytes", type=int, default=20_000_000, help="largest response read (default 20 MB)")
    down.add_argument("--ignore-opt-out", action="store_true",
                      help="also keep images whose server sends X-Robots-Tag: noai/noimageai/noindex/noimageindex")
    down.add_argument("--resize", type=int, metavar="N", help="target side in px (default: keep the size)")
    down.add_argument("--resize-mode", default="keep_ratio", choices=["keep_ratio", "center_crop", "border", "no"],
                      help="keep_ratio: shorter side N; center_crop: N x N; border: longer side N, padded to N x N")
    down.add_argument("--upscale", action="store_true", help="let --resize enlarge smaller images")
    down.add_argument("--encode-format", default="jpg", choices=["jpg", "png", "webp"])
    down.add_argument("--encode-quality", type=int, default=95, help="jpg/webp quality (default 95)")
    down.add_argument("--max-pixels", type=_whole(1), default=64_000_000, help="decompression-bomb guard (default 64M)")
    down.add_argument("--allow-private", action="store_true",
                      help="fetch from loopback and private addresses too (refused by default: a URL list from "
                           "elsewhere must not reach into this machine's network)")
    down.add_argument("--shard", help="i/N: only the shards k with k %% N == i (default: RANK/WORLD_SIZE if set)")
    down.add_argument("--merge-only", action="store_true",
                      help="only write filelist.txt and download_report.json from the finished shards")
    down.add_argument("--quiet", "--no-progress", action="store_true", help="no progress bar")
    down.set_defaults(run=_data_download)

    from difftrain.curate.items import CAPTION_MODES, FORMATS, KEEP_RULES, CurateOptions as Curate  # torch-free

    cur = data.add_parser("curate", help="filter, dedupe and caption a data set into a new one, with a report")
    _source_arguments(cur, "output folder (the report goes beside it, in OUT-report)")
    cur.add_argument("--format", default=Curate.format, choices=FORMATS, help="what to write")
    cur.add_argument("--per-shard", type=_whole(1), default=Curate.per_shard,
                     help="records per part/tar (shard formats)")
    cur.add_argument("--dedupe", default=",".join(Curate.dedupe),
                     help=f"comma list of exact, phash, clip ('' for none; default {','.join(Curate.dedupe)})")
    cur.add_argument("--phash-distance", type=int, default=Curate.phash_distance, help="near-duplicates: at most this many of 64 bits apart")
    cur.add_argument("--clip-duplicate", type=float, default=Curate.clip_duplicate, help="--dedupe clip: cosine at or above which two images are one")
    cur.add_argument("--keep", default=Curate.keep, choices=KEEP_RULES, help="which member of a duplicate group stays")
    cur.add_argument("--min-size", type=int, default=Curate.min_size, help="drop images whose shorter side is below this (px)")
    cur.add_argument("--max-aspect", type=float, default=Curate.max_aspect, help="drop images whose long/short side ratio is above this")
    cur.add_argument("--min-file-size", type=int, default=Curate.min_file_size, help="bytes")
    cur.add_argument("--max-file-size", type=int, default=Curate.max_file_size, help="bytes")
    cur.add_argument("--clip", help="CLIP folder or hub id (default openai/clip-vit-large-patch14 when a step needs one)")
    cur.add_argument("--clip-min", type=float, help="drop records whose image-caption CLIP cosine is below this (LAION: 0.28 with ViT-B/32)")
    cur.add_argument("--aesthetic", help="LAION aesthetic predictor weights (.pth or .safetensors)")
    cur.add_argument("--aesthetic-min", type=float, help="drop images scoring below this (the seed suggests 6.5)")
    cur.add_argument("--caption", help="image-to-text model folder or hub id (BLIP, BLIP-2, GIT, Florence-2, ...)")
    cur.add_argument("--caption-mode", default=Curate.caption_mode, choices=CAPTION_MODES)
    cur.add_argument("--caption-prompt", help="text the captioner starts from (Florence-2: <MORE_DETAILED_CAPTION>)")
    cur.add_argument("--caption-prefix", default=Curate.caption_prefix, help="put in front of every caption, e.g. 'sks dog, '")
    cur.add_argument("--caption-max-tokens", type=int, default=Curate.caption_max_tokens)
    cur.add_argument("--batch-size", type=int, default=Curate.batch_size, help="images per model call")
    cur.add_argument("--device", default=Curate.device)
    cur.add_argument("--cache-dir", help="where model outputs are kept by content (default ~/.cache/difftrain/curate)")
    cur.add_argument("--report", help="report folder (default OUT-report)")
    cur.add_argument("--shard", help="i/N: only fill the cache for slice i of N; a final run without it writes")
    cur.add_argument("--force", action="store_true", help="replace OUT if it exists")
    cur.add_argument("--no-progress", action="store_true")
    cur.set_defaults(run=_data_curate)

    checkpoint = commands.add_parser("checkpoint", help="work on training checkpoints").add_subparsers(
        dest="checkpoint_command", required=True)
    joined = checkpoint.add_parser("consolidate", help="join an FSDP checkpoint's per-process parts into whole files")
    joined.add_argument("checkpoint", help="a checkpoint folder (runs/NAME/checkpoints/step-N)")
    joined.add_argument("--out", help="write the files here instead of into the checkpoint folder")
    joined.set_defaults(run=_checkpoint_consolidate)

    model = commands.add_parser("model", help="make models").add_subparsers(dest="model_command", required=True)
    tiny = model.add_parser("tiny-sd", help="write a tiny random Stable Diffusion (diffusers format) for tests")
    tiny.add_argument("out")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.set_defaults(run=_model_tiny_sd)

    export = model.add_parser("export-controlnet", help="a diffusers ControlNet folder as one original-layout file")
    export.add_argument("src", help="diffusers ControlNet folder")
    export.add_argument("out", help="output .safetensors")
    export.add_argument("--dtype", default="fp16", choices=["fp32", "fp16", "bf16"])
    export.set_defaults(run=_export_controlnet)

    up = commands.add_parser("upscale", help="enlarge images with ESRGAN, Real-ESRGAN or Lanczos, as A1111's Extras")
    up.add_argument("images", nargs="+", help="image files, or folders of them")
    up.add_argument("--upscaler", required=True, metavar="NAME|FILE",
                    help="a model upscaler's A1111 name in --upscaler-dir (e.g. 'R-ESRGAN 4x+') or its "
                         ".pth/.safetensors file; or Lanczos or Nearest (with --scale)")
    up.add_argument("--scale", type=_finite, help="enlarge this many times (default: the model's own factor)")
    up.add_argument("--resize", metavar="WxH", help="enlarge to cover this size instead, cut to it around the middle")
    up.add_argument("--no-crop", action="store_true", help="with --resize: keep the covering image whole")
    up.add_argument("--upscaler-2", metavar="NAME|FILE", help="a second upscaler blended in (A1111's Upscaler 2)")
    up.add_argument("--upscaler-2-visibility", type=_finite, default=0.5, metavar="X",
                    help="its share of the result (default 0.5)")
    up.add_argument("--upscaler-dir", default="models/upscalers", help="where names are looked for")
    up.add_argument("--out", required=True, help="folder for the PNGs")
    up.add_argument("--tile", type=int, default=192, help="tile side in px, 0: the whole image at once (default 192, "
                                                          "A1111's)")
    up.add_argument("--device", default="auto")
    up.add_argument("--no-progress", action="store_true")
    up.set_defaults(run=_upscale)

    onnx = commands.add_parser("export", help="export a Stable Diffusion to ONNX for ONNX Runtime (fp32, fp16, int8)")
    onnx.add_argument("model", help="run folder, model folder, hub id or single-file .safetensors")
    onnx.add_argument("out", help="a new folder (diffusers' / Optimum's ONNX layout, with our manifest)")
    onnx.add_argument("--to", default="onnx", choices=["onnx"])
    onnx.add_argument("--precision", default="fp32", choices=["fp32", "fp16"])
    onnx.add_argument("--quantize", choices=["int8"], help="static int8 UNet (calibrated), checked by the quality gate")
    onnx.add_argument("--min-psnr", type=_finite, help="int8: the quality gate's floor in dB (default 22)")
    onnx.add_argument("--force", action="store_true", help="int8: write it even when it fails the quality gate")
    onnx.add_argument("--gate-steps", type=_whole(1), help="int8: the quality gate's sampling steps (default 12)")
    onnx.add_argument("--gate-size", type=_whole(64), help="int8: the gate's image side (default: the size the model was trained at)")
    onnx.add_argument("--gate-clip", metavar="MODEL",
                      help="int8: also compare the gate images' CLIP score to fp32's with this CLIP (folder or hub id)")
    onnx.add_argument("--max-clip-drop", type=_finite,
                      help="int8 with --gate-clip: CLIP score points int8 may lose against fp32 (default 1.0)")
    onnx.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", help="merged into the weights; repeatable")
    onnx.add_argument("--lora-scale", type=_finite, default=1.0, help="every LoRA merged at its weight x this")
    onnx.add_argument("--embedding", action="append", metavar="FILE", help="Textual Inversion embedding, repeatable")
    onnx.add_argument("--controlnet", action="store_true", help="the UNet takes ControlNet residuals as inputs")
    onnx.add_argument("--no-ema", action="store_true", help="a run's raw weights instead of its EMA ones")
    onnx.add_argument("--config", metavar="DIR", help="single-file model: a diffusers folder with its configs")
    onnx.add_argument("--opset", type=_whole(14), help="ONNX opset (default 17; 18 with --exporter dynamo, its least)")
    onnx.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    onnx.add_argument("--no-progress", action="store_true")
    onnx.set_defaults(run=_export)

    gen = commands.add_parser("generate", help="Stable Diffusion text-to-image / img2img, A1111-style")
    gen.add_argument("model", nargs="?", help="run folder, diffusers folder, hub id or single-file .safetensors")
    gen.add_argument("--prompt", help="A1111 syntax: (word:1.3), [word], BREAK, <lora:name:0.8>, prompt editing "
                                      "[from:to:0.5], alternation [a|b], a AND b:0.6")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--scheduler", help="our short names or A1111's sampler names (see --list-schedulers)")
    gen.add_argument("--cfg", type=_finite, help="guidance scale (default 7)")
    gen.add_argument("--seed", type=_SEED)
    gen.add_argument("--variation-seed", type=_SEED, metavar="N",
                     help="A1111's variation seed: image i's noise is slerped toward seed N + i's (-1: random)")
    gen.add_argument("--variation-strength", type=_finite, metavar="F",
                     help="how far toward the variation seed's noise (0-1; default 0, no variation)")
    gen.add_argument("--ensd", type=_whole(-(2**32), 2**32), metavar="N",
                     help="A1111's eta noise seed delta: an ancestral sampler's noise from seed + N (e.g. 31337)")
    gen.add_argument("--eta", type=_finite, metavar="F",
                     help="DDIM's eta, 0 (deterministic, its default) to 1 (as much noise as DDPM): A1111's Eta DDIM; "
                          "the ancestral and SDE samplers draw A1111's default for them, 1")
    gen.add_argument("--seed-resize-from", metavar="WxH",
                     help="A1111's seed resize: each seed's noise as at this size, centred, so a seed keeps its "
                          "composition at another --width/--height")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--batch-size", type=int)
    gen.add_argument("--n-iter", type=int, help="batches to run; image i uses seed + i")
    gen.add_argument("--lora", action="append", metavar="FILE[:WEIGHT]", help="repeatable")
    gen.add_argument("--lora-dir", help="where <lora:name:w> looks for name.safetensors (default models/lora)")
    gen.add_argument("--embedding", action="append", metavar="FILE", help="textual-inversion embedding, repeatable")
    gen.add_argument("--no-ema", action="store_true", help="a run's raw weights instead of its EMA ones")
    gen.add_argument("--clip-skip", type=int)
    gen.add_argument("--precision", choices=["auto", "fp32", "fp16", "bf16"])
    gen.add_argument("--device", help="auto (default: CUDA where there is a GPU), cpu, cuda, cuda:1 ...")
    gen.add_argument("--attention-slicing", action="store_true", default=None)
    gen.add_argument("--vae-tiling", action="store_true", default=None)
    gen.add_argument("--vae-slicing", action="store_true", default=None)
    gen.add_argument("--cpu-offload", action="store_true", default=None)
    gen.add_argument("--compile", action="store_true", default=None,
                     help="torch.compile the UNet and VAE decoder; kernels are kept in ~/.cache/difftrain for later runs")
    gen.add_argument("--compile-mode", choices=COMPILE_MODES,
                     help="auto (default): reduce-overhead (CUDA graphs) on CUDA, default elsewhere")
    gen.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    gen.add_argument("--fuse-qkv", action=argparse.BooleanOptionalAction, default=None,
                     help="one matmul for each attention's query/key/value (default: on for CUDA without LoRAs)")
    gen.add_argument("--deepcache", type=int, metavar="N",
                     help="run the whole UNet every N steps and reuse its deep features between (faster, "
                          "slightly different images; see the README for the measured trade-off)")
    gen.add_argument("--init-image", help="img2img: start from this image; a folder: from each of its images in turn "
                     "(A1111's batch), each written under its own name")
    gen.add_argument("--strength", type=_finite, help="img2img: how far from the init image (0-1, default 0.75); "
                                                      "with the hires fix, its second pass's denoising strength")
    gen.add_argument("--resize-mode", metavar="MODE",
                     help="img2img: how the image comes to --width x --height (A1111's Resize mode): 'just "
                          "resize' (default, stretched), 'crop and resize' (its middle at the aspect), 'resize and "
                          "fill' (fitted inside, the edges stretched into the bands), 'just resize (latent "
                          "upscale)' (encoded at its own size, its latents resized; not with --mask)")
    gen.add_argument("--mask", metavar="FILE", help="inpainting: redraw only where this image is white (or, with a "
                                                    "transparent background, opaque); the rest stays the init image's. "
                                                    "With an --init-image folder: a folder of masks named as the "
                                                    "images (or one mask for all)")
    gen.add_argument("--mask-blur", type=int, metavar="PX", help="soften the mask's edge (default 4, A1111's)")
    gen.add_argument("--masked-content", metavar="MODE", help="what the masked area starts from (A1111's Masked "
                                                                "content): fill, original (default), 'latent noise', "
                                                                "'latent nothing'")
    gen.add_argument("--invert-mask", action="store_true", default=None,
                     help="redraw what the mask leaves black (A1111's Inpaint not masked)")
    gen.add_argument("--only-masked", action="store_true", default=None,
                     help="draw only the mask's box, at the output size, and paste it back (A1111's Inpaint area: "
                          "Only masked): more detail for a small area")
    gen.add_argument("--only-masked-padding", type=int, metavar="PX", help="px around the mask's box (default 32)")
    gen.add_argument("--soft-inpainting", action="store_true", default=None,
                     help="A1111's soft inpainting: the blurred mask's grey edge blends the new content into the old "
                          "(a large --mask-blur suits it); its six settings below, A1111's defaults otherwise")
    for setting, what in SOFT_INPAINTING_FLAGS:
        gen.add_argument(f"--soft-{setting.replace('_', '-')}", type=float, metavar="X",
                         help=f"soft inpainting: {what}")
    gen.add_argument("--hires-scale", type=_finite, metavar="X",
                     help="A1111's hires fix: draw, upscale X times (e.g. 2), redraw as img2img at --strength")
    gen.add_argument("--hires-resize", metavar="WxH", help="hires fix to this size instead of a scale (0: follow "
                                                             "the other side)")
    gen.add_argument("--hires-upscaler", metavar="NAME|FILE",
                     help=f"hires fix upscaler (default Latent): {', '.join(UPSCALERS)}, or a model upscaler (ESRGAN, "
                          "Real-ESRGAN): its A1111 name in --upscaler-dir (e.g. 'R-ESRGAN 4x+', '4x-UltraSharp') or "
                          "its .pth/.safetensors file")
    gen.add_argument("--upscaler-dir", help="where --hires-upscaler (or a PNG's) looks for a model upscaler by name "
                                            "(default models/upscalers; A1111's models folder works)")
    gen.add_argument("--hires-steps", type=int, metavar="N", help="hires fix second pass steps (default: --steps)")
    gen.add_argument("--hires-checkpoint", metavar="MODEL", help="hires fix second pass model (A1111's hires "
                                                                 "checkpoint; default the model's)")
    gen.add_argument("--hires-sampler", metavar="NAME", help="hires fix second pass sampler (default: --scheduler)")
    gen.add_argument("--hires-prompt", metavar="TEXT", help="hires fix second pass prompt (default: --prompt)")
    gen.add_argument("--hires-negative-prompt", metavar="TEXT", help="its negative prompt (default: --negative-prompt)")
    gen.add_argument("--controlnet", action="append", metavar="PATH[:SCALE]",
                     help="a ControlNet (folder, run, hub id, .safetensors) and its weight; repeatable")
    gen.add_argument("--control-image", action="append", metavar="IMAGE",
                     help="one per --controlnet, in order; a ControlNet model (a controlnet run) takes the first")
    gen.add_argument("--preprocess", action="append", choices=["none", "canny", "mask", "segmentation"],
                     help="what turns the control image into the condition (default: none, or what a ControlNet "
                          "model was trained with); once, or per ControlNet")
    gen.add_argument("--control-start", action="append", type=_finite, metavar="F",
                     help="share of the steps before a ControlNet acts (default 0); once, or per ControlNet")
    gen.add_argument("--control-end", action="append", type=_finite, metavar="F",
                     help="share of the steps after which it stops (default 1); once, or per ControlNet")
    gen.add_argument("--canny-low", action="append", type=int, metavar="N",
                     help="canny: lower threshold (default: a difftrain ControlNet's trained one, else 100); once, or "
                          "per ControlNet")
    gen.add_argument("--canny-high", action="append", type=int, metavar="N",
                     help="canny: upper threshold (default: the trained one, else 200); once, or per ControlNet")
    gen.add_argument("--processor-res", action="append", type=int, metavar="N",
                     help="canny at this resolution (the image's short side), then fitted to the output, as A1111's "
                          "Preprocessor Resolution (default: at the output size, as its Pixel Perfect); once, or per "
                          "ControlNet")
    gen.add_argument("--control-resize", action="append", choices=["crop", "resize", "fill"],
                     help="how the control image meets the output size, as A1111's resize modes: crop (Crop and "
                          "Resize, default), resize (Just Resize), fill (Resize and Fill); once, or per ControlNet")
    gen.add_argument("--control-mode", action="append", choices=["balanced", "prompt", "control"],
                     help="A1111's control modes: balanced (default), prompt (My prompt is more important), "
                          "control (ControlNet is more important); once, or per ControlNet")
    gen.add_argument("--guess-mode", action="store_true", help="A1111's 'ControlNet is more important' for every "
                                                               "ControlNet (--control-mode control)")
    gen.add_argument("--config", metavar="DIR", help="single-file model: a diffusers folder with its configs (offline)")
    gen.add_argument("--backend", choices=["auto", "torch", "onnxruntime"],
                     help="auto (default): ONNX Runtime for an ONNX export (difftrain export), torch otherwise")
    gen.add_argument("--provider", choices=["auto", "cpu", "cuda", "tensorrt"],
                     help="ONNX Runtime execution provider (default auto: CUDA where onnxruntime has it)")
    gen.add_argument("--provider-fallback", action="store_true", default=None,
                     help="run on what there is when the provider asked for is missing, instead of refusing")
    gen.add_argument("--from-png", metavar="IMAGE", help="repeat the generation recorded in an image's parameters")
    gen.add_argument("--out", default="outputs", help="output folder (default outputs/)")
    gen.add_argument("--no-progress", action="store_true")
    gen.add_argument("--list-schedulers", action="store_true")
    gen.set_defaults(run=_generate)

    serve = commands.add_parser("serve", help="AUTOMATIC1111's HTTP API (/sdapi/v1) and a job API over models")
    serve.add_argument("models", nargs="+", metavar="MODEL", help="run folders, model folders or single files")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    serve.add_argument("--port", type=_whole(0, 65535), default=7860)
    serve.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", help="HTTP Basic credentials, as A1111's")
    serve.add_argument("--token", help="a bearer token accepted instead (Authorization: Bearer TOKEN)")
    serve.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without credentials")
    serve.add_argument("--allow-host", action="append", metavar="NAME",
                       help="on loopback, also answer this Host name (a reverse proxy that keeps the Host header); "
                            "repeatable. Other names are refused (DNS rebinding)")
    serve.add_argument("--lora-dir", default=SERVE_FOLDERS["--lora-dir"],
                       help="where <lora:name:w> finds name.safetensors")
    serve.add_argument("--embeddings-dir", default=SERVE_FOLDERS["--embeddings-dir"],
                       help="Textual Inversion embeddings (.safetensors) loaded into every served model they fit")
    serve.add_argument("--controlnet-dir", default=SERVE_FOLDERS["--controlnet-dir"],
                       help="the ControlNets (folders or .safetensors) alwayson_scripts units may name")
    serve.add_argument("--upscaler-dir", default=SERVE_FOLDERS["--upscaler-dir"],
                       help="model upscalers (ESRGAN, Real-ESRGAN .pth/.safetensors) hr_upscaler may name")
    serve.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if present)")
    serve.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    serve.add_argument("--max-size", type=_whole(64), default=1024, help="largest width/height served (default 1024)")
    serve.add_argument("--max-steps", type=_whole(1), default=150)
    serve.add_argument("--max-batch-size", type=_whole(1), default=8)
    serve.add_argument("--max-n-iter", type=_whole(1), default=16)
    serve.add_argument("--max-queue", type=_whole(1), default=16, help="jobs waiting before new ones get HTTP 429")
    serve.add_argument("--models-in-memory", type=_whole(1), default=1,
                       help="loaded models kept (A1111's sd_checkpoints_limit); the least recently used goes first")
    serve.set_defaults(run=_serve)

    ev = commands.add_parser("eval", help="FID, KID, IS, precision/recall, CLIP score and LPIPS diversity")
    ev.add_argument("target", help="run folder, model folder, hub id, single file, or a folder of generated images")
    ev.add_argument("--reference", help="real images: a folder, a data source path, or a statistics file")
    ev.add_argument("--reference-source", default="folder", choices=["folder", "jsonl", "laion", "webdataset", "hf"])
    ev.add_argument("--reference-image-key", help="a jsonl reference's image key, an hf one's image column "
                                                  "(default image)")
    ev.add_argument("--reference-caption-key", help="a jsonl reference's caption key, an hf one's caption column "
                                                    "(default caption)")
    ev.add_argument("--reference-max", type=_whole(2), help="use a seeded sample of this many reference images")
    ev.add_argument("--save-reference", metavar="FILE", help="also write the reference statistics (.safetensors)")
    ev.add_argument("--metrics", help="comma list of fid,kid,is,prc,clip,lpips (default: all the inputs allow)")
    ev.add_argument("--num-images", type=_whole(1), default=64, help="images to generate (default 64)")
    ev.add_argument("--images-per-prompt", type=_whole(1), default=4, help="seeds per prompt (default 4; LPIPS needs 2+)")
    ev.add_argument("--prompt", help="one prompt for every image")
    ev.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line")
    ev.add_argument("--negative-prompt")
    ev.add_argument("--seed", type=_SEED, default=0, help="image i uses seed + i; also seeds caption sampling")
    ev.add_argument("--batch-size", type=_whole(1), default=8, help="images per generation batch")
    ev.add_argument("--scheduler", help="as generate/sample take (default DPM++ 2M Karras / dpm++_2m)")
    ev.add_argument("--steps", type=_whole(1))
    ev.add_argument("--cfg", type=_finite)
    ev.add_argument("--width", type=int)
    ev.add_argument("--height", type=int)
    ev.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    ev.add_argument("--no-ema", action="store_true", help="a run's raw weights instead of its EMA ones")
    ev.add_argument("--size", type=_whole(8), help="evaluation resolution in px (default: the images' own)")
    ev.add_argument("--clip-model", help="CLIP folder or hub id (default openai/clip-vit-large-patch14)")
    ev.add_argument("--weights-dir", help="folder holding the metric networks' weight files by their standard names")
    ev.add_argument("--inception-weights", metavar="FILE")
    ev.add_argument("--alexnet-weights", metavar="FILE", help="LPIPS backbone (torchvision's AlexNet)")
    ev.add_argument("--lpips-weights", metavar="FILE", help="LPIPS v0.1 linear heads (lpips' alex.pth)")
    ev.add_argument("--cache-dir", help="reference feature cache (default ~/.cache/difftrain/eval)")
    ev.add_argument("--device", default="auto", help="where it generates and measures: auto, cpu, cuda, cuda:1 ...")
    ev.add_argument("--feature-batch-size", type=_whole(1), help="images per Inception/CLIP batch (default 4 on CPU, 64 on CUDA)")
    ev.add_argument("--out", default="eval", help="output folder (default eval/)")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(run=_eval)

    lora = commands.add_parser("lora", help="merge or convert LoRA files").add_subparsers(dest="lora_command", required=True)
    merge = lora.add_parser("merge", help="bake a LoRA into a full diffusers model folder")
    merge.add_argument("base", help="the model: a diffusers folder, a single file, a hub id or a run folder (a LoRA "
                                    "or Textual Inversion run's own adapter is baked in too)")
    merge.add_argument("lora", help="LoRA file or folder (diffusers or kohya/A1111 keys), or a LoRA run folder")
    merge.add_argument("out", help="new folder for the merged model")
    merge.add_argument("--scale", type=_finite, default=1.0, help="LoRA strength (default 1.0)")
    merge.add_argument("--no-progress", action="store_true")
    merge.set_defaults(run=_lora_merge)
    convert = lora.add_parser("convert", help="convert a LoRA between diffusers and kohya/A1111 keys")
    convert.add_argument("src")
    convert.add_argument("dst", help="output .safetensors file")
    convert.add_argument("--to", required=True, choices=["kohya", "diffusers"])
    convert.set_defaults(run=_lora_convert)

    config = commands.add_parser("config", help="work with run configs").add_subparsers(dest="config_command", required=True)
    config_check = config.add_parser("check", help="validate a config and print it resolved")
    config_check.add_argument("config")
    config_check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    config_check.set_defaults(run=_config_check)
    return parser


def quiet_libraries() -> None:
    """transformers/diffusers chatter (per-file load bars, torchvision notices) hides our own progress."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _out_of_memory(error: BaseException) -> bool:
    """A device or host allocation that failed: torch's OutOfMemoryError (a RuntimeError), its CPU allocator's
    RuntimeError, or Python's MemoryError."""
    text = str(error)
    return (isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in text or "out of memory" in text.lower())


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()  # a run's start-up time counts from here
    args = build_parser().parse_args(argv)
    args.started = started
    quiet_libraries()
    try:
        return args.run(args)
    except DifftrainError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        print(f"error: out of memory ({first[:200]}). Ask for less at once: a smaller size or batch (generate, sample, "
              "eval: --width/--height, --batch-size; train: training.batch_size, gradient_checkpointing, "
              "mixed_precision), or --cpu-offload where the command has it", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
