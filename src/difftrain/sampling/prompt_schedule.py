"""A1111's prompt editing and alternation: which prompt text conditions each sampling step.

`[from:to:when]` draws `from` until step `when`, then `to`; `[to:when]` adds `to` after it and
`[from::when]` drops `from`; a `when` with a decimal point is a fraction of the steps, else a
step number. `[a|b|c]` alternates, one a step. The grammar is the web UI's own (lark, Earley),
so a prompt parses exactly as it does there, odd brackets included, and one it cannot parse is
a single text for every step, as there. What the schedule yields is still A1111 prompt text:
its `(weights)` are read afterwards, per step, by `prompts.encode_pair`.

Steps are counted as the web UI counts them: one per UNet call (a second-order sampler such as
Heun calls it twice a step), step i taking the first entry whose end is >= i. A hires fix's
second pass (`first_pass` steps before it) goes on where the first ended, as the web UI's
timeline does since 1.6: `1.5` is half way through the second pass, `25` its step 5 after 20.

`AND` composes prompts (Composable Diffusion, as the web UI does it): `a cat AND a hat:0.6`
guides toward each part at its weight, uncond + cfg x sum(w_i x (cond_i - uncond)); a prompt
that ends in `:number` is one part at that weight. Each part has its own schedule.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

import torch

from difftrain.sampling.prompts import PromptError

GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""


@functools.cache
def _parser():
    import lark

    return lark.Lark(GRAMMAR, maybe_placeholders=True)


def schedule_steps(scheduler, steps: int) -> int:
    """The steps a prompt's schedule spans when `scheduler` draws `steps`: A1111 sizes it for twice the steps with a
    second-order sampler (Heun, DPM2, DPM++ SDE: diffusers' `order` 2), whose two UNet calls a step it counts."""
    return steps * int(getattr(scheduler, "order", 1))


def _when(number: str, steps: int, first_pass: int | None = None) -> int:
    """The last step of a `[from:to:when]`'s `from`: `0.25` is a quarter of `steps`, `5` step 5; in a hires pass
    after `first_pass` steps, `1.25` a quarter of it and `25` its step 5 after 20 (<= 0: `to` throughout)."""
    if "." in number:
        value = (float(number) - (0.0 if first_pass is None else 1.0)) * steps
    else:
        value = float(number) - (first_pass or 0)
    if not math.isfinite(value):  # (1e400: A1111's int() of it raises too)
        raise PromptError(f"[...:{number}]: an edit's step must be a finite number")
    return min(steps, int(value))


def prompt_schedule(prompt: str, steps: int, first_pass: int | None = None) -> list[tuple[int, str]]:
    """[(end step, text)] for a prompt drawn in `steps` steps (of a hires fix's second pass, after `first_pass`
    steps); one entry when it edits nothing.

    >>> prompt_schedule("a [b:c:0.5]", 10)
    [(5, 'a b'), (10, 'a c')]
    >>> prompt_schedule("a [b:c:1.5]", 10, first_pass=10)
    [(5, 'a b'), (10, 'a c')]
    """
    return list(_schedule(prompt, steps, first_pass))


@functools.lru_cache(maxsize=1024)
def _schedule(prompt: str, steps: int, first_pass: int | None = None) -> tuple[tuple[int, str], ...]:
    """prompt_schedule's, kept for the next draw of the same prompt (generate's next batch, eval's next seeds):
    Earley parsing is superlinear, 11 ms for 83 characters and 1.8 s for 1,300 (benchmarks/prompt_schedule.py)."""
    import lark

    if "[" not in prompt:  # no edit or alternation without one: no parse
        return ((steps, prompt),)
    try:
        tree = _parser().parse(prompt)
    except lark.exceptions.LarkError:
        return ((steps, prompt),)
    ends = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled" and (when := _when(node.children[-2], steps, first_pass)) >= 1:
            ends.add(when)
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))
    return tuple((end, _text_at(tree, end, steps, first_pass)) for end in sorted(ends))


def _text_at(node, step: int, steps: int, first_pass: int | None) -> str:
    if node is None:
        return ""
    if isinstance(node, str):  # a lark Token (a str)
        return str(node)
    if node.data == "scheduled":
        before, after, _, number, _ = node.children
        return _text_at(before if step <= _when(number, steps, first_pass) else after, step, steps, first_pass)
    if node.data == "alternate":
        return _text_at(node.children[(step - 1) % len(node.children)], step, steps, first_pass)
    return "".join(_text_at(child, step, steps, first_pass) for child in node.children)


# The web UI's own: AND as a word, and a part's weight a number after its last colon.
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^(\s*.*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", re.S)


def composable_parts(prompt: str) -> list[tuple[str, float]]:
    """The parts of a prompt between its ANDs, each with its weight (1 when it names none)."""
    parts = []
    for part in _AND.split(prompt):
        text, weight = _WEIGHT.search(part).groups()
        parts.append((text, float(weight) if weight is not None else 1.0))
    return parts


@dataclass
class ScheduledConditioning:
    """Conditioning per span of steps: `pairs[k]` = (positives [parts, tokens, dim], negative [1, tokens, dim])
    conditions steps i <= `ends[k]`; `weights`, one per AND part, say how their guidance adds up.

    Each span is padded to itself only, as the web UI pads a step's prompt and negative prompt
    ("Pad conds"); spans may differ in length, which the UNet's cross-attention takes.
    """

    ends: list[int]
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    padded: bool  # some span's sides differed in 75-token chunks and the shorter was padded
    weights: list[float] = field(default_factory=lambda: [1.0])

    def index_at(self, step: int) -> int:
        return next((k for k, end in enumerate(self.ends) if step <= end), len(self.ends) - 1)

    @property
    def composable(self) -> bool:
        """Guided toward several parts, or one at another weight than 1: not one positive's plain guidance."""
        return self.weights != [1.0]


def encode_schedule(encode, prompt: str, negative_prompt: str, steps: int, composable: bool = True,
                    first_pass: int | None = None) -> ScheduledConditioning:
    """Every part's and the negative prompt's schedules merged, each span through `encode(texts, pad) -> (their
    conditionings, padded)` (prompts.encode_texts); a span repeated is encoded once.

    One part at weight 1 is padded as a pair ("Pad conds"). Several (or a weight) are encoded at their own lengths
    and the parts stacked as A1111 stacks them, each padded by repeating its last vector; the negative stays at its
    own length (the UNet runs it apart when the lengths differ, as A1111 does without "Pad conds").
    Without `composable` (captions read as data: evaluation) AND and a trailing `:number` are plain text.
    `first_pass`: the steps of the pass before, for a hires fix's second pass (prompt_schedule).
    """
    parts = composable_parts(prompt) if composable else [(prompt, 1.0)]
    together = [weight for _, weight in parts] == [1.0]
    schedules = [prompt_schedule(text, steps, first_pass) for text, _ in parts]
    negative = prompt_schedule(negative_prompt, steps, first_pass)
    ends = sorted({end for schedule in [*schedules, negative] for end, _ in schedule})

    def text_at(schedule, step):
        return next(text for end, text in schedule if step <= end)

    encoded: dict[tuple, tuple] = {}
    pairs, padded = [], False
    for end in ends:
        texts = (tuple(text_at(schedule, end) for schedule in schedules), text_at(negative, end))
        if texts not in encoded:
            conditionings, was_padded = encode([*texts[0], texts[1]], together)
            encoded[texts] = _stacked(conditionings[:-1]), conditionings[-1], was_padded
        positives, negative_z, was_padded = encoded[texts]
        pairs.append((positives, negative_z))
        padded |= was_padded
    return ScheduledConditioning(ends, pairs, padded, [weight for _, weight in parts])


def _stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """[parts, tokens, dim]: each part padded to the longest by repeating its last vector (A1111's stack_conds)."""
    longest = max(part.shape[1] for part in parts)
    return torch.cat([torch.cat([part, part[:, -1:].expand(-1, longest - part.shape[1], -1)], dim=1)
                      for part in parts])


__all__ = ["GRAMMAR", "ScheduledConditioning", "composable_parts", "encode_schedule", "prompt_schedule",
           "schedule_steps"]
