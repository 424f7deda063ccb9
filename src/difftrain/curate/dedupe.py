"""Grouping duplicates: identical bytes, close perceptual hashes, or close CLIP embeddings.

Each function returns groups of positions (lists of two or more); which member a group
keeps is the caller's rule. Near-duplicate search avoids comparing all pairs where it can:
perceptual hashes within Hamming distance d share at least one of d + 1 bit bands exactly
(pigeonhole), so only records sharing a band value are compared; CLIP embeddings are
compared block by block, so memory holds one block of cosines at a time.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

_BLOCK = 512  # rows per block of the cosine matrix
_COLUMNS = 16_384  # columns per tile: 512 x 16k float32 is 32 MB, whatever the number of images


def exact_groups(digests: list[str]) -> list[list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for position, digest in enumerate(digests):
        groups[digest].append(position)
    return [group for group in groups.values() if len(group) > 1]


def hash_groups(hashes: list[int], max_distance: int, bits: int = 64) -> list[list[int]]:
    """Records linked by perceptual hashes at most `max_distance` bits apart (transitively)."""
    bands = max_distance + 1
    edges = [round(bits * b / bands) for b in range(bands + 1)]
    links = _Links(len(hashes))
    for low, high in zip(edges, edges[1:]):
        mask = (1 << (high - low)) - 1
        buckets: dict[int, list[int]] = defaultdict(list)
        for position, value in enumerate(hashes):
            buckets[(value >> low) & mask].append(position)
        for members in buckets.values():
            for i, a in enumerate(members):
                for b in members[i + 1:]:
                    if (hashes[a] ^ hashes[b]).bit_count() <= max_distance:
                        links.join(a, b)
    return links.groups()


def embedding_groups(embeddings: np.ndarray, min_cosine: float, progress: bool = False) -> list[list[int]]:
    """Records linked by unit-length embeddings with cosine >= min_cosine (transitively)."""
    from tqdm.auto import tqdm

    links = _Links(len(embeddings))
    # Quadratic: a million embeddings take about an hour on a CPU, so the bar counts blocks of rows.
    for start in tqdm(range(0, len(embeddings), _BLOCK), desc="similar images", unit="block",
                      disable=not progress or len(embeddings) <= _BLOCK, leave=False):
        rows_of = embeddings[start:start + _BLOCK]
        # The upper triangle only, in tiles: a block against every later row would be 2 GB at a million images.
        for first in range(start, len(embeddings), _COLUMNS):
            tile = rows_of @ embeddings[first:first + _COLUMNS].T
            # (an image's unit vector, rounded, can have a cosine of 0.99999994 with itself: 1.0 must still match)
            rows, columns = np.nonzero(tile >= min_cosine - 1e-6)
            for row, column in zip((rows + start).tolist(), (columns + first).tolist()):
                if column > row:
                    links.join(row, column)
    return links.groups()


class _Links:
    """Union-find over positions."""

    def __init__(self, size: int):
        self.parent = list(range(size))

    def find(self, node: int) -> int:
        while self.parent[node] != node:
            self.parent[node] = self.parent[self.parent[node]]
            node = self.parent[node]
        return node

    def join(self, a: int, b: int) -> None:
        a, b = self.find(a), self.find(b)
        if a != b:
            self.parent[max(a, b)] = min(a, b)

    def groups(self) -> list[list[int]]:
        groups: dict[int, list[int]] = defaultdict(list)
        for node in range(len(self.parent)):
            groups[self.find(node)].append(node)
        return [group for group in groups.values() if len(group) > 1]
