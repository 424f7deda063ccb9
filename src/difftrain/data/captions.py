"""Captions of comma-separated tags (booru style), varied as kohya-ss's sd-scripts vary them.

Each time a record is drawn its tags after the first `keep` may be shuffled and each of them
dropped with a probability, from the item's own seeded generator, so a resumed run draws the
same captions as an uninterrupted one.
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
        tags = [tag.strip() for tag in caption.split(",")]
        kept, rest = tags[: self.keep], tags[self.keep:]
        if self.shuffle:
            rng.shuffle(rest)
        if self.dropout:
            rest = [tag for tag in rest if rng.random() >= self.dropout]
        return ", ".join(tag for tag in kept + rest if tag)
