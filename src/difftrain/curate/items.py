"""What curation is asked to do (CurateOptions) and what it found per record (Item)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from difftrain.cache import cache_root
from difftrain.errors import DifftrainError

DEDUPE_KINDS = ("exact", "phash", "clip")
CAPTION_MODES = ("replace", "fill-missing", "append")
FORMATS = ("folder", "laion", "webdataset")
KEEP_RULES = ("largest", "first")


class CurateError(DifftrainError):
    """A curation setting or model that cannot be used; the message says which and why."""


@dataclass
class CurateOptions:
    dedupe: tuple[str, ...] = ("exact",)
    phash_distance: int = 4  # bits of 64; recompressed or resized copies are usually 0-4 apart
    clip_duplicate: float = 0.95  # cosine at or above which two images are one
    keep: str = "largest"
    min_size: int = 0  # shorter side, pixels
    max_aspect: float | None = None  # longer side / shorter side
    min_file_size: int = 0
    max_file_size: int | None = None
    clip_model: str | None = None
    clip_min: float | None = None
    aesthetic: str | None = None  # the predictor's weights file
    aesthetic_min: float | None = None
    captioner: str | None = None
    caption_mode: str = "fill-missing"
    caption_prompt: str | None = None
    caption_prefix: str = ""
    caption_max_tokens: int = 40
    format: str = "folder"
    per_shard: int = 1000
    batch_size: int = 32
    device: str = "cpu"
    max_pixels: int = 64_000_000
    cache_dir: Path = field(default_factory=lambda: cache_root() / "curate")
    report_dir: Path | None = None  # default: <out>-report beside the output
    shard: tuple[int, int] | None = None
    force: bool = False
    progress: bool = True

    def check(self) -> None:
        for kind in self.dedupe:
            if kind not in DEDUPE_KINDS:
                raise CurateError(f"--dedupe {kind}: not a kind of duplicate; choose from {', '.join(DEDUPE_KINDS)}")
        if self.keep not in KEEP_RULES:
            raise CurateError(f"--keep {self.keep}: choose largest or first")
        if self.caption_mode not in CAPTION_MODES:
            raise CurateError(f"--caption-mode {self.caption_mode}: choose from {', '.join(CAPTION_MODES)}")
        if self.format not in FORMATS:
            raise CurateError(f"--format {self.format}: choose from {', '.join(FORMATS)}")
        if self.clip_min is not None and not -1 <= self.clip_min <= 1:
            raise CurateError(f"--clip-min {self.clip_min}: a cosine of image and caption, in [-1, 1] (0.2-0.3 is "
                              "usual; `difftrain eval` reports CLIP score as 100 x the cosine)")
        if not 0 < self.clip_duplicate <= 1:
            raise CurateError(f"--clip-duplicate {self.clip_duplicate}: a cosine, in (0, 1]")
        if self.batch_size < 1 or self.per_shard < 1:
            raise CurateError(f"--batch-size {self.batch_size} / --per-shard {self.per_shard}: give at least 1")
        if not 0 <= self.phash_distance <= 32:
            raise CurateError(f"--phash-distance {self.phash_distance}: give 0 to 32 bits (of 64)")
        if self.max_aspect is not None and self.max_aspect < 1:
            raise CurateError(f"--max-aspect {self.max_aspect}: a ratio of the longer side to the shorter, so >= 1")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise CurateError(f"--shard {self.shard[0]}/{self.shard[1]}: give i/N with 0 <= i < N")
        if self.aesthetic_min is not None and not self.aesthetic:
            raise CurateError("--aesthetic-min needs --aesthetic WEIGHTS (the LAION predictor's file)")
        captioning = [flag for flag, given in (("--caption-mode", self.caption_mode != "fill-missing"),
                                               ("--caption-prompt", self.caption_prompt)) if given]
        if captioning and not self.captioner:  # (--caption-prefix needs none: it goes before the captions there are)
            raise CurateError(f"{' and '.join(captioning)} set how a captioner writes, and none was given: "
                              "add --caption MODEL")
        if self._uses_clip:
            self.clip_model = self.clip_model or _default_clip()
        # an offline, uncached model fails now, not after a pass over the data
        _check_available(self.clip_model if self._uses_clip else None, "CLIP model")
        _check_available(self.captioner, "captioning model")

    @property
    def _uses_clip(self) -> bool:
        return self.clip_min is not None or bool(self.aesthetic) or "clip" in self.dedupe

    @property
    def needs_clip(self) -> bool:
        return self.clip_model is not None and self._uses_clip


def _check_available(model: str | None, what: str) -> None:
    from difftrain.evaluate.clip_score import check_available
    from difftrain.evaluate.weights import EvalError

    if model is not None:
        try:
            check_available(model, what)
        except EvalError as error:
            raise CurateError(str(error)) from None


def _default_clip() -> str:
    from difftrain.evaluate.clip_score import DEFAULT_CLIP

    return DEFAULT_CLIP


@dataclass
class Item:
    """One input record as curation sees it: small, so a million of them fit in memory."""

    index: int  # in the source; -1 for what the source itself left out while indexing
    key: str
    captions: list[str] = field(default_factory=list)
    sha256: str = ""
    width: int = 0
    height: int = 0
    nbytes: int = 0
    scores: dict[str, float] = field(default_factory=dict)
    step: str | None = None  # the step that dropped it; None while kept
    reason: str = ""
    kept_instead: int | None = None  # a duplicate: the position of the member kept
    new_captions: list[str] | None = None  # what the output holds, when captioning changed it

    @property
    def captions_out(self) -> list[str]:
        """The captions the output holds."""
        return self.new_captions if self.new_captions is not None else self.captions

    def drop(self, step: str, reason: str) -> None:
        self.step, self.reason = step, reason


@dataclass
class CurateResult:
    items: list[Item]
    timings: dict[str, tuple[float, int]]  # step -> (seconds, records it processed)
    out: Path | None = None
    report_dir: Path | None = None
