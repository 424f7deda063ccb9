"""What an evaluation shows a person: a one-screen summary, an HTML page with one grid per prompt, metric curves."""

from __future__ import annotations

import html
import math
from pathlib import Path

from PIL import Image, ImageDraw

from difftrain.evaluate.names import RESULTS
from difftrain.evaluate.scores import Group
from difftrain.sampling.images import make_grid

NAMES = {"fid": "FID", "kid": "KID", "is": "Inception score", "precision": "precision", "recall": "recall",
         "clip_score": "CLIP score", "lpips_diversity": "LPIPS diversity"}


def _number(name: str, value) -> str:
    if value is None:
        return "-"
    if name == "kid":
        return f"{value:.5f}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def metric_rows(values: dict) -> list[tuple[str, str, str]]:
    """(label, value, which way is better) for each headline metric present."""
    rows = []
    for name, label in NAMES.items():
        if name in values:
            text = _number(name, values[name])
            if values.get(f"{name}_std") is not None:  # (None: KID's subsets were the whole sets, no spread)
                text += f" ± {_number(name, values[f'{name}_std'])}"
            rows.append((label, text, "lower is better" if RESULTS[name][1] == "min" else "higher is better"))
    return rows


def summary_lines(result: dict, out: Path) -> list[str]:
    values = result["metrics"]
    lines = [f"difftrain eval: {result['target']} ({values['images']} images at {result['settings']['size']} px, "
             f"{result['seconds']:.0f} s)"]
    lines += [f"  {label:16s} {text:22s} ({better})" for label, text, better in metric_rows(values)]
    if result.get("reference"):
        ref = result["reference"]
        cached = " (cached)" if ref["from_cache"] else ""
        lines.append(f"  reference        {ref['images']} images{cached}: {ref['source']}")
    lines += [f"  warning: {text}" for text in result["warnings"]]
    lines.append(f"  report           {out / 'report.html'}  (numbers with settings: {out / 'eval.json'})")
    return lines


# A report shows a sample of what was measured: an FID-30k run with one image per prompt made 30k grid files, and
# 50k unconditional images one grid of 2.5 GB.
REPORT_GROUPS, REPORT_IMAGES = 32, 64


def write_report(out: Path, result: dict, groups: list[Group], columns: int = 8) -> Path:
    """report.html beside eval.json: the numbers, how they were made, and a grid per prompt (grids/*.png) for the
    first REPORT_GROUPS prompts, of at most REPORT_IMAGES images each."""
    grids = out / "grids"
    grids.mkdir(parents=True, exist_ok=True)
    sections = []
    shown = [group for group in groups if group.images]
    for index, group in enumerate(shown[:REPORT_GROUPS]):
        path = grids / f"{index:03d}.png"
        images = group.images[:REPORT_IMAGES]
        make_grid(images, columns=min(columns, len(images))).save(path)
        title = html.escape(group.prompt) if group.prompt else "unconditional samples"
        seeds = f" (seeds {group.seeds[0]}..{group.seeds[-1]})" if group.seeds else ""
        more = f" (the first {len(images)} of {len(group.images)})" if len(images) < len(group.images) else ""
        sections.append(f"<h3>{title}{seeds}{more}</h3><img src='grids/{path.name}' alt='{title}'>")
    if len(shown) > REPORT_GROUPS:
        sections.append(f"<p>... and {len(shown) - REPORT_GROUPS} more prompts (every image is in images/)</p>")
    rows = "".join(f"<tr><td>{label}</td><td>{text}</td><td>{better}</td></tr>"
                   for label, text, better in metric_rows(result["metrics"]))
    settings = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>"
                       for k, v in {**result["generation"], **result["settings"]}.items())
    warnings = "".join(f"<li>{html.escape(w)}</li>" for w in result["warnings"])
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>difftrain eval: {html.escape(result['target'])}</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 10px;vertical-align:top}}img{{image-rendering:pixelated;max-width:100%}}</style>
</head><body><h1>difftrain eval</h1><p>{html.escape(result['target'])}: {result['metrics']['images']} images</p>
<h2>Metrics</h2><table>{rows}</table>{f'<ul>{warnings}</ul>' if warnings else ''}
<h2>Samples</h2>{''.join(sections)}
<h2>Settings</h2><table>{settings}</table></body></html>"""
    path = out / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def plot_metric_curves(history: list[dict], out: Path, size: tuple[int, int] = (640, 200)) -> Path | None:
    """One panel per metric over training steps (metrics.jsonl's eval lines), PIL only."""
    names = [n for n in NAMES if sum(1 for h in history if h.get(n) is not None) >= 1]
    if not names or not history:
        return None
    width, height = size
    left, right, top, bottom = 70, 15, 20, 25
    image = Image.new("RGB", (width, height * len(names)), "white")
    draw = ImageDraw.Draw(image)
    steps = [h["step"] for h in history]
    first, last = min(steps), max(steps)
    for row, name in enumerate(names):
        points = [(h["step"], h[name]) for h in history if h.get(name) is not None and math.isfinite(h[name])]
        y0 = row * height
        draw.rectangle([left, y0 + top, width - right, y0 + height - bottom], outline=(160, 160, 160))
        label = f"{NAMES[name]} ({'lower' if RESULTS[name][1] == 'min' else 'higher'} is better)"
        draw.text((left + 6, y0 + 4), label, fill=(30, 30, 30))
        if not points:
            continue
        low, high = min(v for _, v in points), max(v for _, v in points)
        if high - low < 1e-12:
            low, high = low - 1, high + 1

        def xy(step, value):
            x = left + (step - first) / max(1, last - first) * (width - left - right)
            return x, y0 + top + (high - value) / (high - low) * (height - top - bottom)

        draw.text((4, y0 + top), f"{high:.4g}", fill=(90, 90, 90))
        draw.text((4, y0 + height - bottom - 12), f"{low:.4g}", fill=(90, 90, 90))
        if len(points) > 1:
            draw.line([xy(s, v) for s, v in points], fill=(30, 90, 200), width=2)
        for s, v in points:
            x, y = xy(s, v)
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))
        draw.text((left, y0 + height - bottom + 6), f"step {first}", fill=(90, 90, 90))
        draw.text((width - right - 90, y0 + height - bottom + 6), f"step {last}", fill=(90, 90, 90))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
