"""What curation did, in the forms a person checks it in.

- report.json: counts per step, time per step, and every dropped record with its reason and scores;
- scores.jsonl: one line per input record (kept or not) with every score measured, to pick
  thresholds again without re-running a model;
- histograms.png: each score's distribution, kept and dropped stacked, the threshold drawn;
- contact_sheet.html: one self-contained page of thumbnails, kept and dropped per step, the
  ones nearest the threshold first (where a wrong threshold shows), each duplicate beside
  the image it duplicates.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import asdict
from pathlib import Path

from PIL import Image, ImageDraw

from difftrain.atomic import write_text
from difftrain.curate.items import CurateOptions, CurateResult, Item
from difftrain.data.images import BadImage, load_image_bytes
from difftrain.data.records import BadRecord, RecordSource

SHEET_MAX = 60  # thumbnails per section: enough to judge a threshold, small enough to open anywhere
THUMB = 128
STEPS = ("read", "size", "aesthetic", "clip", "duplicate", "write")  # the order they drop a record in
_KEPT, _DROPPED = (60, 150, 90), (200, 70, 60)
REPORT_FILES = ("report.json", "scores.jsonl", "histograms.png", "contact_sheet.html")  # what a report folder holds


def write_report(source: RecordSource, result: CurateResult, options: CurateOptions, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    items = result.items
    keys = {item.index: item.key for item in items}
    summary, scores, histograms, sheet = (folder / name for name in REPORT_FILES)
    write_text(summary, json.dumps(_summary(source, result, options, keys), indent=2) + "\n")
    write_text(scores, "".join(json.dumps(_row(item, keys)) + "\n" for item in items))
    plot_histograms(items, options, histograms)
    write_text(sheet, _contact_sheet(source, items))
    return folder


def counts(items: list[Item]) -> dict:
    dropped = {step: sum(item.step == step for item in items) for step in STEPS}
    return {"records": len(items), "kept": sum(item.step is None for item in items),
            "dropped": {step: n for step, n in dropped.items() if n},
            "captioned": sum(item.new_captions is not None for item in items if item.step is None)}


def _summary(source: RecordSource, result: CurateResult, options: CurateOptions, keys: dict[int, str]) -> dict:
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()
                if k not in ("progress", "force", "report_dir")}
    return {
        "input": source.description,
        "output": str(result.out),
        "settings": settings,
        "counts": counts(result.items),
        "not_judged_by_clip": (sum("clip" not in item.scores for item in result.items
                                   if item.step in (None, "duplicate")) if options.clip_min is not None else 0),
        "timings": {step: {"seconds": round(seconds, 3), "records": n,
                           "per_second": round(n / seconds, 1) if seconds > 0 else None}
                    for step, (seconds, n) in result.timings.items()},
        "dropped": [_row(item, keys) for item in result.items if item.step is not None],
        # what the source found wrong with captions while indexing; their records are kept, so not dropped
        "caption_problems": [{"where": where, "reason": reason} for where, reason in source.notes],
    }


def _row(item: Item, keys: dict[int, str]) -> dict:
    row = {"key": item.key, "kept": item.step is None, "width": item.width, "height": item.height,
           "bytes": item.nbytes, "sha256": item.sha256, "scores": item.scores, "captions": item.captions}
    if item.step:
        row.update(step=item.step, reason=item.reason)
    if item.kept_instead is not None:
        row["duplicate_of"] = keys[item.kept_instead]
    if item.new_captions is not None:
        row["new_captions"] = item.new_captions
    return row


# ----------------------------------------------------------------------------- histograms
def plot_histograms(items: list[Item], options: CurateOptions, out: Path, bins: int = 30) -> Path:
    panels = [("shorter side (px)", lambda i: min(i.width, i.height) if i.width else None, options.min_size or None)]
    if any("clip" in i.scores for i in items):
        panels.append(("CLIP image-caption cosine", lambda i: i.scores.get("clip"), options.clip_min))
    if any("aesthetic" in i.scores for i in items):
        panels.append(("aesthetic score", lambda i: i.scores.get("aesthetic"), options.aesthetic_min))
    width, height = 520, 220
    sheet = Image.new("RGB", (width, height * len(panels)), "white")
    for row, (title, value, threshold) in enumerate(panels):
        kept = [v for i in items if i.step is None and (v := value(i)) is not None]
        dropped = [v for i in items if i.step is not None and (v := value(i)) is not None]
        sheet.paste(_histogram(title, kept, dropped, threshold, bins, (width, height)), (0, row * height))
    sheet.save(out)
    return out


def _histogram(title: str, kept: list[float], dropped: list[float], threshold: float | None, bins: int,
               size: tuple[int, int]) -> Image.Image:
    width, height = size
    left, right, top, bottom = 50, 15, 28, 30
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), f"{title}: {len(kept)} kept (green), {len(dropped)} dropped (red)", fill=(30, 30, 30))
    values = kept + dropped + ([threshold] if threshold is not None else [])
    if not kept + dropped:
        return image
    low, high = min(values), max(values)
    span = (high - low) or 1.0

    def bin_of(v: float) -> int:
        return min(bins - 1, int((v - low) / span * bins))

    heights = [[0, 0] for _ in range(bins)]
    for column, group in enumerate((kept, dropped)):
        for v in group:
            heights[bin_of(v)][column] += 1
    tallest = max(a + b for a, b in heights) or 1
    plot_w, plot_h = width - left - right, height - top - bottom
    for b, (a, d) in enumerate(heights):
        x0, x1 = left + b * plot_w / bins, left + (b + 1) * plot_w / bins - 1
        base = top + plot_h
        for count, colour in ((a, _KEPT), (d, _DROPPED)):
            if count:
                draw.rectangle([x0, base - count / tallest * plot_h, x1, base], fill=colour)
                base -= count / tallest * plot_h
    draw.rectangle([left, top, width - right, top + plot_h], outline=(160, 160, 160))
    if threshold is not None:
        x = left + (threshold - low) / span * plot_w
        draw.line([x, top, x, top + plot_h], fill=(30, 30, 30), width=2)
        draw.text((min(x + 4, width - right - 90), top + 2), f"threshold {threshold:g}", fill=(30, 30, 30))
    draw.text((left, top + plot_h + 8), f"{low:.3g}", fill=(90, 90, 90))
    draw.text((width - right - 50, top + plot_h + 8), f"{high:.3g}", fill=(90, 90, 90))
    draw.text((4, top), str(tallest), fill=(90, 90, 90))
    return image


# ----------------------------------------------------------------------------- contact sheet
def _contact_sheet(source: RecordSource, items: list[Item]) -> str:
    by_index = {item.index: item for item in items}
    sections = [("kept", "nearest the thresholds first", _nearest_first([i for i in items if i.step is None], True))]
    for step in STEPS:
        dropped = [i for i in items if i.step == step]
        if dropped:
            sections.append((f"dropped: {step}", f"{len(dropped)} records", _nearest_first(dropped, False)))
    body, thumbnails = [], {}  # index -> <img>: a record shown twice (kept, and kept instead) is read once
    for title, note, chosen in sections:
        cards = []
        for item in chosen[:SHEET_MAX]:
            cards.append(_card(source, item, thumbnails))
            if item.kept_instead is not None:
                cards.append(_card(source, by_index[item.kept_instead], thumbnails, label="kept instead"))
        shown = f" (showing {min(len(chosen), SHEET_MAX)})" if len(chosen) > SHEET_MAX else ""
        body.append(f"<h2>{html.escape(title)}</h2><p>{html.escape(note)}{shown}</p><div class=grid>{''.join(cards)}</div>")
    summary = html.escape(json.dumps(counts(items)))
    return (f"<!doctype html><meta charset=utf-8><title>difftrain curate</title><style>{_STYLE}</style>"
            f"<h1>difftrain data curate</h1><p>{summary}</p>" + "".join(body))


def _nearest_first(items: list[Item], kept: bool) -> list[Item]:
    """Kept: lowest scores first (the next to go if a threshold rose); dropped: highest first."""
    def score(item: Item) -> float:
        found = [v for k, v in item.scores.items() if k in ("clip", "aesthetic")]
        return min(found) if found else math.inf * (1 if kept else -1)

    return sorted(items, key=score, reverse=not kept)


def _card(source: RecordSource, item: Item, thumbnails: dict[int, str], label: str = "") -> str:
    lines = [label, item.key, item.reason] + [f"{k} {v:.3g}" for k, v in item.scores.items()]
    if item.captions_out:
        lines.append(f"“{item.captions_out[0][:80]}”")
    text = "<br>".join(html.escape(line) for line in lines if line)
    if item.index not in thumbnails:
        thumbnails[item.index] = _thumbnail(source, item)
    return f"<figure>{thumbnails[item.index]}<figcaption>{text}</figcaption></figure>"


def _thumbnail(source: RecordSource, item: Item) -> str:
    try:
        if item.index < 0:  # left out by the source while indexing: there is no record to read
            raise BadImage(item.reason)
        image = load_image_bytes(source.read(item.index).data)
    except (BadRecord, BadImage):
        return "<div class=broken>unreadable</div>"
    image.thumbnail((THUMB, THUMB))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return f"<img src='data:image/jpeg;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"


_STYLE = ("body{font-family:sans-serif;margin:1em}.grid{display:flex;flex-wrap:wrap;gap:8px}"
          "figure{margin:0;width:140px;font-size:11px;word-break:break-all}"
          "img,.broken{width:128px;height:128px;object-fit:contain;background:#eee;display:block}")
