"""`difftrain eval`: draw images from a model (or take a folder of them) and measure them.

A model is anything `load_pipeline` takes; Stable Diffusion models draw through
`generate.Drawer` (the code `difftrain generate` runs), pixel models through the sampler
`difftrain sample` runs. Outputs in the output folder: `eval.json` (every number with its
settings), `report.html` (the numbers and one grid per prompt), `images/` (what was
measured, PNGs with their parameters) and a one-screen summary on the terminal.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from difftrain.atomic import write_text
from difftrain.data.images import load_image
from difftrain.evaluate import metrics as m
from difftrain.evaluate.names import METRICS
from difftrain.evaluate.reference import (
    Reference,
    keyed_options,
    load_statistics_file,
    measured_features,
    open_records,
    reference_features,
    save_reference,
)
from difftrain.evaluate.scores import (
    NEEDS_REFERENCE,
    Group,
    Networks,
    Scorer,
    StoredImages,
    check_metrics,
    warn_small,
)
from difftrain.evaluate.weights import EvalError
from difftrain.generate.text2image import resolve_device
from difftrain.sampling.prompts import extract_lora_tags


@dataclass
class EvalOptions:
    metrics: list[str] | None = None  # None: every metric the inputs allow
    reference: str | None = None  # image folder, data source path, or statistics file (.safetensors / .npz)
    reference_source: str = "folder"  # folder, jsonl, laion, webdataset, hf
    reference_image_key: str | None = None  # a jsonl reference's image key, an hf one's image column
    reference_caption_key: str | None = None
    reference_max: int | None = None  # a seeded sample of the reference, for speed
    num_images: int = 64
    images_per_prompt: int = 4
    prompt: str | None = None
    prompts_file: str | None = None
    negative_prompt: str = ""
    seed: int = 0
    batch_size: int = 8
    scheduler: str | None = None  # default: generate's (SD) or sample's (pixel models)
    steps: int | None = None
    guidance_scale: float | None = None
    width: int | None = None
    height: int | None = None
    use_ema: bool = True
    precision: str = "auto"
    size: int | None = None  # evaluation resolution; default the images' own
    cache_dir: str | None = None
    save_reference: str | None = None
    networks: Networks = field(default_factory=Networks)


@dataclass
class EvalResult:
    metrics: dict
    out_dir: Path
    summary: list[str]


def evaluate(target: str, options: EvalOptions, out_dir: str | Path, progress: bool = True) -> EvalResult:
    started = time.time()
    out = Path(out_dir)
    if options.prompts_file and options.prompt:
        raise EvalError("give --prompt or --prompts, not both")
    if options.num_images < 1 or options.images_per_prompt < 1:
        raise EvalError("--num-images and --images-per-prompt must be at least 1")
    if options.metrics is not None:
        check_metrics(options.metrics)  # before any model loads
    if options.save_reference:
        if Path(options.save_reference).suffix != ".safetensors":
            raise EvalError(f"--save-reference {options.save_reference}: statistics are written as safetensors; "
                            "give the file a .safetensors name")
        if not options.reference or _is_statistics_file(options.reference):
            raise EvalError("--save-reference writes the statistics of a --reference folder or data set; "
                            f"{'none was given' if not options.reference else options.reference + ' is one already'}")
        if options.metrics is not None and not any(name in options.metrics for name in NEEDS_REFERENCE):
            raise EvalError(f"--save-reference: --metrics {','.join(options.metrics)} uses no reference, so there "
                            f"are no statistics to save; add one of {', '.join(NEEDS_REFERENCE)} to --metrics")
    warnings: list[str] = []
    reference_records = None
    if options.reference and not _is_statistics_file(options.reference):
        reference_records = open_records(options.reference, options.reference_source, options.reference_max,
                                          progress=progress, setting="--reference",
                                          **keyed_options(options.reference_source, options.reference_image_key,
                                                          options.reference_caption_key))
    is_folder = _is_image_folder(target)
    if options.reference and _inside(out, options.reference):  # (the report would be measured as real images)
        raise EvalError(f"--out {out} is inside the --reference folder {options.reference}: its images and grids "
                        "would be read as reference images next time; give --out another folder")
    if is_folder:
        if _inside(out, target):  # before the report's images/ stand in for it: the report itself is measured
            raise EvalError(f"--out {out} is inside the folder being measured ({target}): its report and grids "
                            "would be measured next time; give --out another folder")
        if (Path(target) / "eval.json").is_file():  # an earlier eval's output: its images, never its grids
            if not (Path(target) / "images").is_dir():
                measured = json.loads((Path(target) / "eval.json").read_text()).get("target")
                raise EvalError(f"{target} is an eval report of {measured} (it holds grids, not the images): "
                                "measure that instead")
            target = str(Path(target) / "images")
        if _inside(out, target):
            raise EvalError(f"--out {out} is inside the folder being measured ({target}): its report and grids "
                            "would be measured next time; give --out another folder")
        groups, generation = _read_folder(target, options, warnings, progress), {"source": str(target)}
        has_prompts = any(group.prompt for group in groups)
    else:
        from difftrain.generate.loader import locate

        located = locate(target, options.use_ema)
        if located.folder is None:  # a mistyped path is named before the metric networks load (or download)
            from difftrain.models.sd import check_exists

            check_exists("target", target)
        has_prompts = located.manifest is None or located.manifest.kind != "unconditional"
    wanted = _wanted_metrics(options, has_prompts, warnings)
    networks = replace(options.networks, device=str(resolve_device(options.networks.device)))
    scorer = Scorer(wanted, networks)  # a missing network is reported before anything is drawn
    statistics = None
    if reference_records is None and options.reference and any(name in wanted for name in NEEDS_REFERENCE):
        # A statistics file that cannot serve (not one, damaged, other weights) is refused before hours of drawing;
        # its size is held to the images' once that is known.
        statistics = load_statistics_file(options.reference, scorer.info.get("inception"), options.size)
    if not is_folder:
        groups, generation = _draw(located, options, reference_records, warnings, _fresh_images_dir(out), progress)
    if not any(group.images for group in groups):
        raise EvalError(f"{target}: no images to evaluate")
    size = options.size or _common_size(groups)
    reference = None
    if any(name in wanted for name in NEEDS_REFERENCE):
        reference = _reference(options, reference_records, statistics, scorer, size, progress)
        if reference.skipped:
            warnings.append(f"reference: {len(reference.skipped)} unreadable image(s) skipped (listed in eval.json)")
        for text in (warn_small(reference.count, "the reference") if reference.count else None,
                     warn_small(sum(len(g.images) for g in groups), "the evaluated set")):
            if text:
                warnings.append(text)
        if reference.features is None and any(name in wanted for name in ("kid", "prc")):
            warnings.append("the reference statistics hold mu and sigma only: KID and precision/recall need its "
                            "features (a file from --save-reference has them); FID only")
    warnings += _count_warnings(wanted, groups, reference, options)
    if scorer.custom_weights:
        warnings.append(f"metric networks with other than the published weights ({', '.join(scorer.custom_weights)}): "
                        "the numbers compare only with numbers from these same weights")
    inception = None
    if is_folder and scorer.inception is not None:  # (drawn images are new; a folder is often measured again)
        digests = [digest for group in groups for digest in group.images.digests]
        features, logits, generation["features_from_cache"] = measured_features(
            digests, itertools.chain.from_iterable(group.images for group in groups), scorer.inception, size,
            options.cache_dir, progress)
        inception = (features, logits)
    values = scorer.score(groups, size, reference, progress, inception)
    result = {
        "target": str(target),
        "metrics": values,
        "generation": generation,
        "reference": reference.info() | {"skipped_images": reference.skipped} if reference else None,
        "settings": scorer.settings(size) | {"size": size, "seed": options.seed},
        "warnings": warnings,
        "seconds": round(time.time() - started, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "eval.json", json.dumps(result, indent=2, default=str) + "\n", sync=False)
    from difftrain.evaluate.report import summary_lines, write_report

    write_report(out, result, groups)
    return EvalResult(values, out, summary_lines(result, out))


def _count_warnings(wanted: list[str], groups: list[Group], reference, options: EvalOptions) -> list[str]:
    """What the image counts make of the metrics: refused where a metric cannot be computed, said where it is
    bounded or skewed by them."""
    count = sum(len(group.images) for group in groups)
    if count < 2 and any(name in wanted for name in ("fid", "kid", "prc")):
        raise EvalError(f"{count} image(s): FID, KID and precision/recall need at least 2 (raise --num-images)")
    warnings = []
    per_split = count // min(m.IS_SPLITS, count)
    if "is" in wanted and per_split < m.IS_STABLE_SPLIT:
        warnings.append(f"Inception score from {count} images in splits of {per_split}: a split's score cannot exceed "
                        f"its image count, so this IS is capped at {per_split} (published IS use 50,000 images)")
    prompts = [group for group in groups if group.prompt]
    if prompts and any(len(group.images) > 1 for group in prompts) and "fid" in wanted:
        warnings.append(f"{count} images from {len(prompts)} prompts: FID from several images a prompt covers fewer "
                        "prompts than the reference and reads higher than one image a prompt (COCO FID's rule); "
                        "--images-per-prompt 1 for FID, more for LPIPS diversity")
    features = getattr(reference, "features", None)
    if "prc" in wanted and features is not None:
        ratio = max(count, len(features)) / max(min(count, len(features)), 1)
        if min(count, len(features)) <= m.PRC_NEIGHBOURS:
            warnings.append(f"precision/recall need more than {m.PRC_NEIGHBOURS} images on each side: not computed")
        elif ratio > 2:
            warnings.append(f"precision/recall of {count} images against {len(features)}: k-NN radii depend on each "
                            "set's density, so unequal sizes skew them (recall reads high for a small generated set); "
                            "compare equal sizes (--reference-max)")
    return warnings


def _inside(out: Path, folder: str | Path) -> bool:
    """Whether `out` is `folder` or inside it."""
    return out.resolve() == Path(folder).resolve() or Path(folder).resolve() in out.resolve().parents


def _fresh_images_dir(out: Path) -> Path:
    """`out/images`, emptied of an earlier eval's images (a later `difftrain eval OUT` measures them all, and
    another model's or seed's would be mixed in); a folder of images not ours is refused, never emptied. Ours:
    an earlier eval of a model drew them (an eval of a folder writes eval.json too, and draws nothing)."""
    images = out / "images"
    earlier = sorted(images.glob("*")) if images.is_dir() else []
    try:
        drawn = "model" in json.loads((out / "eval.json").read_text()).get("generation", {})
    except (OSError, ValueError, AttributeError):
        drawn = False
    if earlier and not drawn:
        raise EvalError(f"--out {out}: {images} holds files that no earlier eval drew; give --out a new folder")
    for path in earlier:
        if path.suffix == ".png" and path.is_file():
            path.unlink()
    return images


def _is_statistics_file(path: str) -> bool:
    return Path(path).suffix in (".npz", ".safetensors") and Path(path).is_file()


def _is_image_folder(target: str) -> bool:
    path = Path(target)
    if not path.is_dir():
        return False
    from difftrain.run_folder import is_run_folder

    markers = ("difftrain.json", "model_index.json", "unet", "config.json")
    return not is_run_folder(path) and not any((path / marker).exists() for marker in markers)


def _wanted_metrics(options: EvalOptions, has_prompts: bool, warnings: list[str]) -> list[str]:
    if options.metrics is not None:
        wanted = check_metrics(options.metrics)
        if not options.reference and any(name in NEEDS_REFERENCE for name in wanted):
            raise EvalError(f"{', '.join(n for n in wanted if n in NEEDS_REFERENCE)} compare with real images: "
                            "give --reference (an image folder, a data source or a statistics file)")
        if "clip" in wanted and not has_prompts:
            raise EvalError("clip score needs the prompts of the images: these images have none")
        return wanted
    wanted = [name for name in METRICS if (options.reference or name not in NEEDS_REFERENCE)
              and (has_prompts or name != "clip")]
    if not options.reference:
        warnings.append("no --reference: FID, KID and precision/recall were not computed")
    return wanted


def _common_size(groups: list[Group]) -> int:
    sizes = [min(size) for group in groups for size in group.sizes()]
    return max(set(sizes), key=sizes.count)


def _reference(options: EvalOptions, records, statistics: Reference | None, scorer: Scorer, size: int,
               progress: bool) -> Reference:
    if statistics is not None:
        statistics.check_size(size)
        return statistics
    reference = reference_features(records, scorer.inception, size, options.cache_dir, progress)
    if options.save_reference:
        save_reference(reference, options.save_reference, scorer.inception.info, size)
    return reference


# --------------------------------------------------------------------------- images to measure
def prompt_list(count: int, per_prompt: int, seed: int, records=None, prompt: str | None = None,
                prompts_file: str | None = None, prompts: list[str] | None = None,
                warnings: list[str] | None = None) -> list[str]:
    """The prompt of each of `count` images, `per_prompt` consecutive images sharing one.

    From, in order: one `prompt`; the lines of `prompts_file` (blank ones skipped and counted);
    a list of `prompts`; a seeded sample of the captions of `records`.
    """
    if prompt:
        return [prompt] * count
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise EvalError(f"--prompts {path}: no such file")
        lines = path.read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
        if len(prompts) < len(lines) and warnings is not None:
            warnings.append(f"--prompts {path}: {len(lines) - len(prompts)} blank line(s) skipped")
        if not prompts:
            raise EvalError(f"--prompts {path}: no prompts in it")
    if not prompts and records is not None and len(records):
        prompts = records.sample_captions(math.ceil(count / per_prompt), seed)
    if not prompts:
        raise EvalError("a text-to-image model needs prompts: give --prompt, --prompts FILE, "
                        "or a captioned --reference to sample captions from")
    return [prompts[(i // per_prompt) % len(prompts)] for i in range(count)]


def _draw(located, options: EvalOptions, records, warnings: list[str], images_dir: Path,
          progress: bool) -> tuple[list[Group], dict]:
    target = str(located.source)
    if located.manifest is not None and located.manifest.kind == "unconditional":
        return _draw_unconditional(target, options, images_dir, progress)
    from difftrain.generate.text2image import Drawer, GenerateOptions
    from difftrain.sampling.text2image import prompt_batches

    plan = prompt_list(options.num_images, options.images_per_prompt, options.seed, records, options.prompt,
                       options.prompts_file, warnings=warnings)
    tagged = next((prompt for prompt in plan if extract_lora_tags(prompt)[1]), None)
    if tagged is not None:
        raise EvalError(f"prompt {tagged!r} names a LoRA: evaluate the LoRA's run folder (its model carries it), "
                        "not a <lora:...> tag, which eval would read as words")
    given = {"prompt": plan[0], "negative_prompt": options.negative_prompt, "seed": options.seed, "compose": False,
             "use_ema": options.use_ema, "precision": options.precision, "width": options.width,
             "height": options.height, "batch_size": options.batch_size, "device": options.networks.device}
    for name, value in (("scheduler", options.scheduler), ("steps", options.steps),
                        ("guidance_scale", options.guidance_scale)):
        if value is not None:
            given[name] = value
    generate_options = GenerateOptions(**given)
    drawer = Drawer(located, generate_options, progress=False)
    groups: dict[str, Group] = {}
    bar = tqdm(total=options.num_images, desc="generating", unit="img", disable=not progress, dynamic_ncols=True)
    images_dir.mkdir(parents=True, exist_ok=True)
    for start, end in prompt_batches(plan, options.batch_size):
        prompt, seeds = plan[start], list(range(options.seed + start, options.seed + end))
        group = groups.setdefault(prompt, Group(prompt, StoredImages(load_image)))
        for seed, image in zip(seeds, drawer.draw(prompt, options.negative_prompt, seeds)):
            path = images_dir / f"{seed - options.seed:05d}-{seed}.png"
            drawer.save(image, path, prompt, options.negative_prompt, seed)
            group.images.append(path, image.size)
            group.seeds.append(seed)
        bar.update(len(seeds))
    bar.close()
    generation = {"model": str(target), "kind": "stable-diffusion", "scheduler": generate_options.scheduler,
                  "steps": generate_options.steps, "cfg": generate_options.guidance_scale,
                  "size": f"{drawer.width}x{drawer.height}", "seeds": f"{options.seed}..{options.seed + len(plan) - 1}",
                  "prompts": len(groups), "images_per_prompt": options.images_per_prompt,
                  "ema": options.use_ema, "through": "difftrain generate's Drawer"}
    return list(groups.values()), generation


def _draw_unconditional(target: str, options: EvalOptions, images_dir: Path,
                        progress: bool) -> tuple[list[Group], dict]:
    from difftrain.generate.unconditional import draw_settings, load_unconditional
    from difftrain.sampling.loop import sample_unet_batches

    model = load_unconditional(target, options.use_ema)
    model.unet.eval().to(resolve_device(options.networks.device))
    scheduler, steps = options.scheduler or "dpm++_2m", options.steps or 25
    # A class model: every class in turn, guided at --cfg or as its training previews were.
    guidance = options.guidance_scale if model.classes else None  # an unconditional model ignores --cfg, as before
    settings = draw_settings(model, options.num_images, guidance_scale=guidance)
    images_dir.mkdir(parents=True, exist_ok=True)
    images = StoredImages(load_image)
    for batch in sample_unet_batches(model.unet, model.scheduler_config, options.num_images, scheduler, steps,
                                     options.seed, options.batch_size, progress, **settings):
        for image in batch:
            path = images_dir / f"{len(images):05d}.png"
            image.save(path)
            images.append(path, image.size)
    generation = {"model": str(target), "kind": "unconditional", "scheduler": scheduler, "steps": steps,
                  "batch_size": options.batch_size, "seed": options.seed,
                  **({"classes": len(model.classes), "cfg": settings["guidance_scale"]} if settings else {}),
                  "through": "difftrain sample's loop (image i from seed + i)"}
    return [Group(None, images)], generation


def _read_folder(target: str, options: EvalOptions, warnings: list[str], progress: bool) -> list[Group]:
    """Images already generated: each PNG's own prompt (its infotext), else its caption, else --prompt."""
    from difftrain.generate.infotext import parse_infotext

    records = open_records(target, "folder", None, progress=progress, setting="target")
    if records.skipped:
        warnings.append(f"{target}: {len(records.skipped)} unreadable file(s) skipped: "
                        + "; ".join(f"{k}: {r}" for k, r in records.skipped[:3]))
    if records.source.notes:  # (their images are measured; a caption stands in for a prompt only where it is read)
        warnings.append(f"{target}: {len(records.source.notes)} caption problem(s): "
                        + "; ".join(f"{k}: {r}" for k, r in records.source.notes[:3]))
    groups: dict[str | None, Group] = {}
    for index, record, image in records.images():
        text = image.info.get("parameters") or _header_parameters(record.data)
        prompt = parse_infotext(text)[0] if text else (record.captions[0] if record.captions else options.prompt)
        groups.setdefault(prompt, Group(prompt, StoredImages(records.image))).images.append(
            index, image.size, hashlib.sha256(record.data).hexdigest())
    return list(groups.values())


def _header_parameters(data: bytes) -> str | None:
    """A PNG's infotext from the file itself: decoding RGBA, 16-bit or colour-managed pixels to sRGB RGB makes a
    new image, without the file's `info`."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as header:
        return header.info.get("parameters")


__all__ = ["EvalOptions", "EvalResult", "evaluate", "prompt_list"]
