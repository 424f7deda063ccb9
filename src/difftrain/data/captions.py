"""Captions of comma-separated tags (booru style), varied as kohya-ss's sd-scripts vary them.

Each time a record is drawn its tags after the first `keep` may be shuffled and each of them
dropped with a probability, from the item's own seeded generator, so a resumed run draws the
same captions as an uninterrupted one. A caption without a comma is left as it is (kohya would
drop a single tag whole, an unasked caption dropout), and so are DreamBooth's fixed prompts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionTags:
    shuffle: bool = False
    keep: int = 0  # the first tags stay first, in place (a trigger word)
    dropout: float = 0.0  # each later tag is dropped with this probability

    @property
    def active(self) -> bool:
        return self.shuffle or self.dropout > 0

    def __call__(self, caption: str, rng: random.Random) -> str:
        if "," not in caption:  # a sentence, or a single tag: nothing to shuffle, and never dropped whole
            return caption
        tags = [tag.strip() for tag in caption.split(",")]
        kept, rest = tags[: self.keep], tags[self.keep:]
        if self.shuffle:
            rng.shuffle(rest)
        if self.dropout:
            rest = [tag for tag in rest if rng.random() >= self.dropout]
        return ", ".join(tag for tag in kept + rest if tag)
