"""The loss curve as a picture, drawn with PIL so plotting needs no extra dependency."""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw


def read_metrics(path: Path) -> list[tuple[int, float]]:
    """(step, loss) pairs from metrics.jsonl; a resumed run's re-logged steps keep the last value."""
    if not path.is_file():
        return []
    by_step: dict[int, float] = {}
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
            by_step[int(entry["step"])] = float(entry["loss"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return sorted(by_step.items())


def drop_metrics_after(path: Path, step: int) -> None:
    """metrics.jsonl without the lines of steps after `step`: a run resumed from an earlier checkpoint draws its
    curves from its own steps, not the abandoned branch's (or the lost steps after a kill) beyond them."""
    from difftrain.atomic import write_text

    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)

    def kept(line: str) -> bool:
        try:
            return int(json.loads(line)["step"]) <= step
        except (ValueError, KeyError, TypeError):
            return False  # a line cut short by a kill
    if not all(map(kept, lines)):
        write_text(path, "".join(filter(kept, lines)), sync=False)


def plot_loss_curve(points: list[tuple[int, float]], out: Path, size: tuple[int, int] = (640, 360)) -> Path | None:
    """Loss against step on a log scale, raw in grey and smoothed in blue."""
    points = [(s, v) for s, v in points if v > 0 and math.isfinite(v)]
    if len(points) < 2:
        return None
    width, height = size
    left, right, top, bottom = 60, 15, 15, 30
    steps = [s for s, _ in points]
    logs = [math.log10(v) for _, v in points]
    low, high = min(logs), max(logs)
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5

    def xy(step: float, log_value: float) -> tuple[float, float]:
        x = left + (step - steps[0]) / max(1, steps[-1] - steps[0]) * (width - left - right)
        y = top + (high - log_value) / (high - low) * (height - top - bottom)
        return x, y

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline=(160, 160, 160))
    for decade in range(math.floor(low), math.ceil(high) + 1):
        for mantissa in (1, 2, 5):
            value = math.log10(mantissa) + decade
            if low <= value <= high:
                _, y = xy(steps[0], value)
                draw.line([left, y, width - right, y], fill=(230, 230, 230))
                draw.text((4, y - 6), f"{10 ** value:.3g}", fill=(90, 90, 90))
    draw.line([xy(s, v) for s, v in zip(steps, logs)], fill=(190, 190, 190))
    smoothed, value = [], logs[0]
    for v in logs:
        value = 0.9 * value + 0.1 * v
        smoothed.append(value)
    draw.line([xy(s, v) for s, v in zip(steps, smoothed)], fill=(30, 90, 200), width=2)
    draw.text((left, height - bottom + 8), f"step {steps[0]}", fill=(90, 90, 90))
    draw.text((width - right - 90, height - bottom + 8), f"step {steps[-1]}", fill=(90, 90, 90))
    draw.text((left + 6, top + 4), "training loss (log scale)", fill=(30, 30, 30))
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
