"""`difftrain data curate`: one pass of filters over any source, a curated copy, and a report.

The steps, in the order they drop a record (each record is dropped by the first that
rejects it, and the report says which, why, and with what score):

1. read       the bytes, the image header and (when a later step needs pixels) a full decode;
2. size       shorter side, aspect ratio and file size limits;
3. aesthetic  LAION's predictor on the CLIP image embedding below `aesthetic_min`;
   caption    (drops nothing) an image-to-text model writes captions for the records kept
              (`caption_mode`: replace every caption, fill only missing ones, or append to
              what is there); `caption_prefix` (a trigger word) goes in front of every
              caption last, after the CLIP filter, which it would skew;
4. clip       cosine between the CLIP image embedding and its best caption's below
              `clip_min`, judged on the captions the output will hold (a caption about to be
              replaced is not judged; records left without one are not judged, and counted);
5. duplicates identical bytes, then perceptual hashes or CLIP embeddings closer than the
              threshold; each group keeps one record by `keep` (largest: most pixels, then
              most bytes, then first; first: first in source order). Duplicates are sought
              among the records the quality filters kept, so a group is never lost because
              the member it kept failed a later filter. (So near-duplicates are captioned
              too; identical bytes once.)

Model outputs are cached by content (cache.py), so changing a threshold re-runs no model.
With `shard=(i, n)` a process only fills the cache for its contiguous slice of the source
(per-record steps only; nothing is written); the final run without a shard then finds
every feature cached, judges duplicates across the whole set and writes the output.
Under `accelerate launch` that split happens by itself: each rank fills its slice, and
rank 0 writes once all are done.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from difftrain.atomic import CONTENTS_STAGING, contents_lock, is_bookkeeping, replace_contents
from difftrain.curate import dedupe
from difftrain.curate.cache import FeatureCache, model_identity, pack_vector, text_key, unpack_vector
from difftrain.curate.items import CurateError, CurateOptions, CurateResult, Item
from difftrain.curate.report import REPORT_FILES, counts, write_report
from difftrain.curate.scorers import AestheticPredictor, Captioner
from difftrain.data.images import DECODE_VERSION, BadImage, check_decodes, image_size_from_bytes, load_image_bytes
from difftrain.data.records import BadRecord, RawRecord, RecordSource
from difftrain.data.remote import is_url
from difftrain.data.sources import finish_interrupted_curate
# Features computed from decoded pixels are kept per decode version: a decode that changes (colour profiles
# applied) must not be served a feature of the old pixels.
PHASH_SPACE = f"phash:{DECODE_VERSION}"


class _Timer:
    def __init__(self):
        self.timings: dict[str, tuple[float, int]] = {}

    def add(self, step: str, seconds: float, count: int) -> None:
        total, counted = self.timings.get(step, (0.0, 0))
        self.timings[step] = (total + seconds, counted + count)


def curate(source: RecordSource, out: str | Path, options: CurateOptions,
           inputs: tuple[str | Path, ...] = ()) -> CurateResult | None:
    """Curate `source` into `out`; None on an `accelerate launch` rank other than 0 (rank 0 writes).
    `inputs`: files the source was opened from (a jsonl list), which OUT must not hold either."""
    options.check()
    out = Path(os.path.abspath(out))
    final = options.shard is None
    if final:  # before any work, on every process alike, so all of them stop together
        _check_output(out, options.force, source, inputs, _report_dir(out, options))
    if final and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from datetime import timedelta

        from accelerate import PartialState

        # cpu=True makes accelerate join a launched world over gloo; otherwise, with no GPU, each rank would run
        # alone and all of them would write the output. Slices take unequal time (a re-run finds some cached):
        # the barrier waits as long as the work may take, not the collectives' default 30 minutes.
        state = PartialState(cpu=options.device == "cpu", timeout=timedelta(hours=48))
        curate(source, out, replace(options, shard=(state.process_index, state.num_processes)), inputs)
        state.wait_for_everyone()
        if not state.is_main_process:
            return None
    timer, cache = _Timer(), FeatureCache(options.cache_dir)
    try:
        features = _Features(source, cache, options, timer)
        items = _read(source, shard_slice(len(source), options.shard), features)
        _filter_below(items, "aesthetic", options.aesthetic_min, "aesthetic score {:.2f} < {}")
        features.caption([i for i in items if i.step is None])
        if options.clip_min is not None:
            # Those the aesthetic filter dropped too, on their own captions: the report shows every score, and a
            # lower --aesthetic-min next time finds their text embeddings cached.
            features.score_captions([i for i in items if i.step in (None, "aesthetic")])
            _filter_below(items, "clip", options.clip_min, "CLIP image-caption cosine {:.3f} < {}")
        if final:
            started, candidates = time.perf_counter(), [i for i in items if i.step is None]
            _drop_duplicates(candidates, features, options)
            timer.add("dedupe", time.perf_counter() - started, len(candidates))
        features.add_prefix(items)
    finally:
        cache.close()
    result = CurateResult(items, timer.timings)
    if final:
        kept = [i for i in items if i.step is None]
        result.out = _write_output(source, kept, out, options, timer) if kept else None
        result.report_dir = write_report(source, result, options, _report_dir(out, options))
        if not kept:
            dropped = ", ".join(f"{n} {step}" for step, n in counts(items)["dropped"].items())
            raise CurateError(f"every record was dropped ({dropped}), nothing written to {out}; the scores are in "
                              f"{result.report_dir}: loosen a threshold")
    return result


def shard_slice(total: int, shard: tuple[int, int] | None) -> range:
    """The records a `--shard i/N` process measures."""
    # contiguous slices: shard sources are read front to back, each shard by one process
    if shard is None:
        return range(total)
    index, count = shard
    return range(total * index // count, total * (index + 1) // count)


def _report_dir(out: Path, options: CurateOptions) -> Path:
    # beside the output, not in it: a folder source would take the thumbnails for training images
    return Path(options.report_dir) if options.report_dir else out.with_name(out.name + "-report")


def _check_output(out: Path, force: bool, source: RecordSource, inputs: tuple, report: Path) -> None:
    """Refuse, before any work, an OUT that is in use: the current folder or one above it, not empty without
    --force, or holding the data being curated (--force would replace it with the output); a report
    folder inside OUT (its contact sheets and histograms would become training images); and either one inside
    the folder being curated."""
    if Path.cwd().is_relative_to(out):
        raise CurateError(f"{out} is the current folder or holds it; give OUT as a folder of its own")
    report = Path(os.path.abspath(report))
    if report.is_relative_to(out) or report.resolve().is_relative_to(out.resolve()):
        raise CurateError(f"--report {report} is inside OUT {out}; its thumbnails would be read as training images "
                          "(and the swap of OUT replaces it): give a folder outside OUT")
    if report.is_dir():  # an earlier report is written over; a folder of anything else is not written into
        others = sorted(e.name for e in report.iterdir() if e.name not in REPORT_FILES and not e.name.startswith("."))
        if others:
            raise CurateError(f"--report {report} holds other files than a curate report ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}): give a new folder for the report")
    for folder in (Path(os.path.abspath(path)).resolve() for path in map(str, inputs) if not is_url(path)):
        for given, what in ((out, "OUT"), (report, "--report")):  # (OUT the folder itself: refused below)
            if folder.is_dir() and given.resolve() != folder and given.resolve().is_relative_to(folder):
                raise CurateError(f"{what} {given} is inside the folder being curated ({folder}): its images would "
                                  "be read as more of that data next time; give a folder outside it")
    if not (out.exists() or out.is_symlink()):
        return
    if not out.is_dir():
        raise CurateError(f"{out} is a file; give OUT as a folder")
    finish_interrupted_curate(out)
    if all(is_bookkeeping(entry.name) for entry in out.iterdir()):
        return
    if not force:
        raise CurateError(f"{out} already exists and is not empty: give a new folder, or --force to replace it")
    roots = {out, out.resolve()}
    # The files' folders, not each file: one resolve a folder (a source reached through a link too).
    folders = {Path(os.path.abspath(path)).parent
               for path in [*(path for _, path, _ in source.stored_files()), *map(str, inputs)] if not is_url(path)}
    for folder in folders:
        if any(form.is_relative_to(root) for form in (folder, folder.resolve()) for root in roots):
            raise CurateError(f"{out} holds the data being curated ({folder}); --force would delete it. Give "
                              "another folder for the output")


def _read(source: RecordSource, indices: range, features: "_Features") -> list[Item]:
    """Every record of `indices` as an Item, through the size limits and measured: one read each.

    The bytes of the records the size limits keep wait, a batch at a time, for `features.measure`
    to decode them; only that batch's bytes and images are held, whatever the source's size.
    """
    options, timer = features.options, features.timer
    timer.add("read", 0.0, 0)  # first in the report's timings, as the step that runs first
    items, batch, seconds = [], [], 0.0
    keep_bytes = features.needs_pixels
    for index in tqdm(indices, desc="reading", unit="img", disable=not options.progress):
        started = time.perf_counter()
        try:
            record = source.read(index)
        except BadRecord as reason:
            item = Item(index, f"#{index}")
            item.drop("read", str(reason))
            items.append(item)
            seconds += time.perf_counter() - started
            continue
        item = Item(index, record.key, list(record.captions), hashlib.sha256(record.data).hexdigest(),
                    nbytes=len(record.data))
        try:
            item.width, item.height = image_size_from_bytes(record.data)
            _filter_size(item, options)
            if item.step is None and not keep_bytes:  # a kept record; else measuring decodes it (and drops it)
                check_decodes(record.data, options.max_pixels)
        except BadImage as reason:
            item.drop("read", str(reason))
        items.append(item)
        seconds += time.perf_counter() - started
        if item.step is None and keep_bytes:
            batch.append((item, record.data))
            if len(batch) == options.batch_size:
                features.measure(batch)
                batch = []
    if batch:
        features.measure(batch)
    timer.add("read", seconds, len(items))
    if len(indices) == len(source):  # what the source left out while indexing is the whole run's to report
        for where, reason in source.skipped:
            items.append(Item(-1, where, step="read", reason=reason))
    return items


def _filter_size(item: Item, options: CurateOptions) -> None:
    short, long = sorted((item.width, item.height))
    if short < options.min_size:
        item.drop("size", f"shorter side {short} px < {options.min_size}")
    elif options.max_aspect and long / max(short, 1) > options.max_aspect:
        item.drop("size", f"aspect ratio {long / max(short, 1):.2f} > {options.max_aspect}")
    elif item.nbytes < options.min_file_size:
        item.drop("size", f"{item.nbytes} bytes < {options.min_file_size}")
    elif options.max_file_size is not None and item.nbytes > options.max_file_size:
        item.drop("size", f"{item.nbytes} bytes > {options.max_file_size}")


def _filter_below(items: list[Item], score: str, minimum: float | None, reason: str) -> None:
    """Drop the kept records whose `score` is below `minimum` (records without that score are not judged)."""
    if minimum is None:
        return
    for item in items:
        value = item.scores.get(score)
        if item.step is None and value is not None and value < minimum:
            item.drop(score, reason.format(value, minimum))


def _drop_duplicates(items: list[Item], features: "_Features", options: CurateOptions) -> None:
    def rank(position: int) -> tuple:
        item = items[position]
        return (item.index,) if options.keep == "first" else (-item.width * item.height, -item.nbytes, item.index)

    def apply(groups: list[list[int]], what: str, score) -> None:
        nonlocal items
        for group in groups:
            kept = min(group, key=rank)
            for position in group:
                if position != kept:
                    items[position].drop("duplicate", f"{what} of {items[kept].key}")
                    items[position].kept_instead = items[kept].index
                    items[position].scores[f"{what}_score"] = score(position, kept)
        items = [item for item in items if item.step is None]

    if "exact" in options.dedupe:
        apply(dedupe.exact_groups([item.sha256 for item in items]), "copy", lambda a, b: 0.0)
    if "phash" in options.dedupe:
        hashes = [features.phash[item.index] for item in items]
        apply(dedupe.hash_groups(hashes, options.phash_distance), "near-duplicate",
              lambda a, b: float((hashes[a] ^ hashes[b]).bit_count()))
    if "clip" in options.dedupe:
        vectors = np.stack([features.embeddings[item.index] for item in items]) if items else np.zeros((0, 1))
        apply(dedupe.embedding_groups(vectors, options.clip_duplicate, options.progress), "similar image",
              lambda a, b: float(vectors[a] @ vectors[b]))


class _Features:
    """Runs (or finds in the cache) what the steps measure, in batches, one model load each."""

    def __init__(self, source: RecordSource, cache: FeatureCache, options: CurateOptions, timer: _Timer):
        self.source, self.cache, self.options, self.timer = source, cache, options, timer
        self.phash: dict[int, int] = {}
        self.embeddings: dict[int, np.ndarray] = {}  # kept only for CLIP dedupe: the rest is scored per batch
        self._clip = self._aesthetic = self._captioner = None
        if options.needs_clip:
            self.clip_space = model_identity(options.clip_model)
            self.image_space = f"clip-image:{DECODE_VERSION}:{self.clip_space}"
        if options.captioner:
            self.caption_space = "caption:" + model_identity(options.captioner, options.caption_prompt,
                                                             options.caption_max_tokens, DECODE_VERSION)
        if options.aesthetic:
            self.aesthetic()  # a wrong weights file fails now, before an hour of CLIP

    # -- loading each model once, and only when some record misses the cache
    def clip(self):
        if self._clip is None:
            from difftrain.evaluate.clip_score import ClipScorer
            from difftrain.evaluate.weights import EvalError

            try:
                self._clip = ClipScorer(self.options.clip_model, self.options.device, self.options.batch_size)
            except EvalError as error:
                raise CurateError(str(error)) from None
        return self._clip

    def aesthetic(self) -> AestheticPredictor:
        if self._aesthetic is None:
            self._aesthetic = AestheticPredictor(self.options.aesthetic)
        return self._aesthetic

    def captioner(self) -> Captioner:
        if self._captioner is None:
            o = self.options
            self._captioner = Captioner(o.captioner, o.device, o.batch_size, o.caption_prompt, o.caption_max_tokens)
        return self._captioner

    @property
    def needs_pixels(self) -> bool:
        """Whether measuring decodes images (phash or CLIP), so the read pass hands it their bytes."""
        return "phash" in self.options.dedupe or self.options.needs_clip

    def measure(self, batch: list[tuple[Item, bytes]]) -> None:
        """phash, CLIP image embedding and aesthetic score of one batch of (item, its bytes),
        as the steps need them; an image is decoded only when the cache lacks something of it."""
        o = self.options
        want_hash, want_clip = "phash" in o.dedupe, o.needs_clip
        shas = [item.sha256 for item, _ in batch]
        hashes = self.cache.get(PHASH_SPACE, shas) if want_hash else {}
        vectors = self.cache.get(self.image_space, shas) if want_clip else {}
        missing = [(item, data) for item, data in batch
                   if (want_hash and item.sha256 not in hashes) or (want_clip and item.sha256 not in vectors)]
        images = self._decode(missing)
        if want_hash:
            hashes.update(self._phashes(images, hashes))
        if want_clip:
            vectors.update(self._image_embeddings(images, vectors))
        items = [item for item, _ in batch if item.step is None]  # a failed decode dropped some
        if want_hash:
            for item in items:
                self.phash[item.index] = int.from_bytes(hashes[item.sha256], "big")
        if want_clip and items:
            self._score(items, np.stack([unpack_vector(vectors[item.sha256]) for item in items]))

    def _decode(self, batch: list[tuple[Item, bytes]]) -> dict[str, object]:
        """sha256 -> decoded image of each distinct content in `batch`; the items that fail to decode are dropped."""
        started, images, failed = time.perf_counter(), {}, {}
        for item, data in batch:
            if item.sha256 not in images and item.sha256 not in failed:  # identical bytes decode alike: once
                try:
                    images[item.sha256] = load_image_bytes(data, self.options.max_pixels)
                except BadImage as reason:
                    failed[item.sha256] = str(reason)
            if item.sha256 in failed:
                item.drop("read", failed[item.sha256])
        self.timer.add("decode", time.perf_counter() - started, len(batch))
        return images

    def _phashes(self, images: dict, cached: dict[str, bytes]) -> dict[str, bytes]:
        import imagehash

        started = time.perf_counter()
        found = {sha: int(str(imagehash.phash(image)), 16).to_bytes(8, "big")
                 for sha, image in images.items() if sha not in cached}
        self.cache.put(PHASH_SPACE, found)
        self.timer.add("phash", time.perf_counter() - started, len(found))
        return found

    def _image_embeddings(self, images: dict, cached: dict[str, bytes]) -> dict[str, bytes]:
        todo = [sha for sha in images if sha not in cached]
        if not todo:
            return {}
        started = time.perf_counter()
        vectors = self.clip().image_embeddings([images[sha] for sha in todo]).numpy()
        found = {sha: pack_vector(vector) for sha, vector in zip(todo, vectors)}
        self.cache.put(self.image_space, found)
        self.timer.add("clip image", time.perf_counter() - started, len(todo))
        return found

    def _score(self, items: list[Item], vectors: np.ndarray) -> None:
        """The aesthetic scores and dedupe embeddings of one batch; vectors are its (N, D) CLIP image embeddings."""
        vectors = _unit(vectors)
        if "clip" in self.options.dedupe:
            self.embeddings.update(zip((item.index for item in items), vectors))
        if self.options.aesthetic:
            started = time.perf_counter()
            for item, score in zip(items, self.aesthetic()(torch.from_numpy(vectors)).tolist()):
                item.scores["aesthetic"] = score
            self.timer.add("aesthetic", time.perf_counter() - started, len(items))

    def score_captions(self, items: list[Item]) -> None:
        """Each captioned record's CLIP cosine between its image and its best caption of those the output holds
        (all embeddings from the cache: the images' since measure, the captions' once computed)."""
        for batch in _batches([item for item in items if item.captions_out], self.options.batch_size):
            vectors = self.cache.get(self.image_space, [item.sha256 for item in batch])
            texts = iter(self._text_embeddings([caption for item in batch for caption in item.captions_out]))
            for item in batch:
                image = _unit(unpack_vector(vectors[item.sha256]))
                item.scores["clip"] = max(float(image @ next(texts)) for _ in item.captions_out)

    def _text_embeddings(self, texts: list[str]) -> list[np.ndarray]:
        """Unit-length CLIP embeddings of `texts`, from the cache where it has them."""
        space, keys = f"clip-text:{self.clip_space}", [text_key(t) for t in texts]
        cached = self.cache.get(space, keys)
        todo = list(dict.fromkeys(t for t, key in zip(texts, keys) if key not in cached))
        if todo:
            started = time.perf_counter()
            found = {text_key(t): pack_vector(v) for t, v in zip(todo, self.clip().text_embeddings(todo).numpy())}
            self.cache.put(space, found)
            cached.update(found)
            self.timer.add("clip text", time.perf_counter() - started, len(todo))
        return [_unit(unpack_vector(cached[key])) for key in keys]

    def caption(self, items: list[Item]) -> None:
        o = self.options
        if o.captioner:
            todo = items if o.caption_mode != "fill-missing" else [i for i in items if not i.captions]
            bar = tqdm(total=len(todo), desc="captioning", unit="img", disable=not o.progress)
            for batch in _batches(todo, o.batch_size):
                found = self.cache.get(self.caption_space, [i.sha256 for i in batch])
                missing = [i for i in batch if i.sha256 not in found]
                if missing:
                    images = self._decode(self._reread(missing))
                    started = time.perf_counter()
                    written = self.captioner()(list(images.values()))
                    made = {sha: text.encode() for sha, text in zip(images, written)}
                    self.cache.put(self.caption_space, made)
                    self.timer.add("caption", time.perf_counter() - started, len(made))
                    found.update(made)
                for item in batch:
                    if item.step is None:
                        item.new_captions = _combine(item.captions, found[item.sha256].decode(), o.caption_mode)
                bar.update(len(batch))
            bar.close()

    def add_prefix(self, items: list[Item]) -> None:
        """The trigger word in front of every kept record's captions: after the CLIP filter, which judges what the
        captions say of the image, not a made-up token."""
        prefix = self.options.caption_prefix
        for item in items:
            if prefix and item.step is None:
                item.new_captions = [prefix + c for c in item.captions_out] or [prefix.strip()]

    def _reread(self, items: list[Item]) -> list[tuple[Item, bytes]]:
        """(item, its bytes) for a later pass, in source order (shard sources then read each shard once);
        an item whose record cannot be read again is dropped."""
        batch = []
        for item in items:
            try:
                data = self.source.read(item.index).data
                _check_unchanged(data, item)
                batch.append((item, data))
            except BadRecord as reason:
                item.drop("read", str(reason))
        return batch


def _unit(vectors: np.ndarray) -> np.ndarray:
    """`vectors` (one, or one per row) scaled to unit length."""
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def _check_unchanged(data: bytes, item: Item) -> None:
    """A record read again must be the one measured: its scores, and the captions cached under its hash, are
    those bytes'."""
    if hashlib.sha256(data).hexdigest() != item.sha256:
        raise BadRecord(f"{item.key}: changed since it was measured in this run; curate again to measure it")


def _combine(captions: list[str], written: str, mode: str) -> list[str]:
    if not written.strip():  # the captioner wrote nothing: the record keeps what it had
        return captions
    if mode == "append" and captions:
        return [f"{c.rstrip().rstrip(',.')}, {written}" for c in captions]
    return captions if mode == "fill-missing" and captions else [written]


def _batches(items: list[Item], size: int) -> Iterator[list[Item]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class _CuratedSource(RecordSource):
    """The kept records of a source, with their new captions: what the shard and folder writers take."""

    def __init__(self, source: RecordSource, kept: list[Item], named: bool):
        self._source, self._kept, self._named = source, kept, named  # named: written as files, each with its extension
        self.description, self.skipped, self.shard_sizes = f"curated {source.description}", [], None
        self.sizes = np.array([(i.width, i.height) for i in kept], dtype=np.int32).reshape(-1, 2)
        self.uncaptioned = sum(not i.captions_out for i in kept)

    def __len__(self) -> int:
        return len(self._kept)

    def read(self, index: int) -> RawRecord:
        item = self._kept[index]
        try:
            record = self._source.read(item.index)
            _check_unchanged(record.data, item)
        except BadRecord as reason:  # gone or changed since it was measured: the writer skips it, the counts say so
            item.drop("read", str(reason))
            raise
        if self._named:
            from difftrain.data.shards import image_extension

            try:
                image_extension(record)  # what the writer asks: a record it would skip is dropped here, and counted
            except BadRecord as reason:
                item.drop("write", str(reason))
                raise
        return RawRecord(record.key, record.data, item.captions_out, record.conditioning)


def _write_output(source: RecordSource, kept: list[Item], out: Path, options: CurateOptions, timer: _Timer) -> Path:
    """Write into a hidden folder inside OUT, then swap it in: a run that fails leaves OUT as it was, and
    only OUT need be writable (a mounted volume, a folder in a read-only parent)."""
    from difftrain.data.shards import build_shards, export_folder

    started = time.perf_counter()
    curated = _CuratedSource(source, kept, named=options.format != "laion")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / CONTENTS_STAGING
    # Held while writing too: a training run that opens OUT meanwhile waits rather than taking the staging
    # folder for a killed run's and deleting it.
    with contents_lock(out, f"waiting for another `difftrain data curate` writing into {out}"):
        shutil.rmtree(staging, ignore_errors=True)
        try:
            if options.format == "folder":
                written = export_folder(curated, staging, progress=options.progress)
            else:
                written = build_shards(curated, staging, options.format, options.per_shard, progress=options.progress)
        except BaseException:
            shutil.rmtree(out if created else staging, ignore_errors=True)
            raise
        relative = written.relative_to(staging)
        replace_contents(out)  # what --force replaces goes only now
    timer.add("write", time.perf_counter() - started, len(kept))
    return out / relative
