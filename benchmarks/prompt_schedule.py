"""What reading A1111's prompt editing costs per draw: lark's Earley parse of a prompt with `[`, against the
shortcut a prompt without one takes (no parse), at several prompt lengths.

    python benchmarks/prompt_schedule.py

A prompt is read once a process (then kept: prompt_schedule's cache), at its first draw; prints ms a prompt
and per character, the cache cleared before each read.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _common  # noqa: E402,F401  (offline, like every benchmark)

PHRASE = "masterpiece, (best quality:1.2), a red [fox:cat:0.4] in the snow, [day|night] sky, "


def per_prompt(prompt: str, rounds: int) -> float:
    from difftrain.sampling.prompt_schedule import _schedule, prompt_schedule

    started = time.perf_counter()
    for _ in range(rounds):
        _schedule.cache_clear()  # each a first read: what the cache saves a prompt's later draws
        prompt_schedule(prompt, 30)
    return (time.perf_counter() - started) / rounds * 1000


def main() -> None:
    from difftrain.sampling.prompt_schedule import prompt_schedule

    prompt_schedule("[warm:up:0.5]", 30)  # (the parser is built once a process)
    for repeats in (1, 4, 16):
        edited = PHRASE * repeats
        plain = edited.replace("[", "(").replace("]", ")").replace("|", " ")
        parsed, shortcut = per_prompt(edited, 20), per_prompt(plain, 2000)
        print(f"{len(edited):5d} characters: parsed {parsed:7.2f} ms ({parsed / len(edited) * 1000:.0f} us a "
              f"character), without '[' {shortcut:.4f} ms (x{parsed / shortcut:,.0f})")


if __name__ == "__main__":
    main()
