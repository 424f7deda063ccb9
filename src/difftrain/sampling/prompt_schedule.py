"""A1111's prompt editing and alternation: which prompt text conditions each sampling step.

`[from:to:when]` draws `from` until step `when`, then `to`; `[to:when]` adds `to` after it and
`[from::when]` drops `from`; a `when` with a decimal point is a fraction of the steps, else a
step number. `[a|b|c]` alternates, one a step. The grammar is the web UI's own (lark, Earley),
so a prompt parses exactly as it does there, odd brackets included, and one it cannot parse is
a single text for every step, as there. What the schedule yields is still A1111 prompt text:
its `(weights)` are read afterwards, per step, by `prompts.encode_pair`.

Steps are counted as the web UI counts them: one per UNet call (a second-order sampler such as
Heun calls it twice a step), step i taking the first entry whose end is >= i.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

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


def _when(number: str, steps: int) -> int:
    """The last step of a `[from:to:when]`'s `from`: `0.25` is a quarter of `steps`, `5` step 5."""
    value = float(number) * steps if "." in number else float(number)
    return min(steps, int(value))


def prompt_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """[(end step, text)] for a prompt drawn in `steps` steps; one entry when it edits nothing.

    >>> prompt_schedule("a [b:c:0.5]", 10)
    [(5, 'a b'), (10, 'a c')]
    """
    import lark

    if "[" not in prompt:  # no edit or alternation without one; Earley parsing is ~0.25 ms a character
        return [(steps, prompt)]
    try:
        tree = _parser().parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    ends = {steps}
    for node in tree.iter_subtrees():
        if node.data == "scheduled" and (when := _when(node.children[-2], steps)) >= 1:
            ends.add(when)
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))
    return [(end, _text_at(tree, end, steps)) for end in sorted(ends)]


def _text_at(node, step: int, steps: int) -> str:
    import lark

    if node is None:
        return ""
    if isinstance(node, lark.Token):
        return str(node)
    if node.data == "scheduled":
        before, after, _, number, _ = node.children
        return _text_at(before if step <= _when(number, steps) else after, step, steps)
    if node.data == "alternate":
        return _text_at(node.children[(step - 1) % len(node.children)], step, steps)
    return "".join(_text_at(child, step, steps) for child in node.children)


def is_scheduled(prompt: str, steps: int) -> bool:
    return len(prompt_schedule(prompt, steps)) > 1


@dataclass
class ScheduledConditioning:
    """(positive, negative) conditioning per span of steps: `pairs[k]` conditions steps i <= `ends[k]`.

    Each pair is padded to itself only, as the web UI pads a step's prompt and negative prompt
    ("Pad conds"); spans may differ in length, which the UNet's cross-attention takes.
    """

    ends: list[int]
    pairs: list[tuple[torch.Tensor, torch.Tensor]]
    padded: bool  # some span's two sides differed in 75-token chunks and the shorter was padded

    def index_at(self, step: int) -> int:
        return next((k for k, end in enumerate(self.ends) if step <= end), len(self.ends) - 1)

    @property
    def first(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pairs[0]


def encode_schedule(encode_pair, prompt: str, negative_prompt: str, steps: int) -> ScheduledConditioning:
    """Both prompts' schedules merged, each span's pair through `encode_pair(prompt, negative) -> (pos, neg,
    padded)`; a pair repeated across spans is encoded once."""
    positive, negative = prompt_schedule(prompt, steps), prompt_schedule(negative_prompt, steps)
    ends = sorted({end for end, _ in positive} | {end for end, _ in negative})

    def text_at(schedule, step):
        return next(text for end, text in schedule if step <= end)

    encoded: dict[tuple[str, str], tuple] = {}
    pairs, padded = [], False
    for end in ends:
        texts = (text_at(positive, end), text_at(negative, end))
        if texts not in encoded:
            encoded[texts] = encode_pair(*texts)
        pos, neg, was_padded = encoded[texts]
        pairs.append((pos, neg))
        padded |= was_padded
    return ScheduledConditioning(ends, pairs, padded)


__all__ = ["GRAMMAR", "ScheduledConditioning", "encode_schedule", "is_scheduled", "prompt_schedule"]
