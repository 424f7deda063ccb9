"""Per-record strings (file paths, keys, captions) packed into two numpy arrays, for DataLoader workers.

A worker forked from the training process shares its memory until a page is written to. A Python
list of a million `str` is a million objects, and reading one writes its reference count, so over
an epoch each worker copies the whole list, page by page, into its own memory: with 8 workers, 8
copies (PyTorch's issue #13246). Packed, the strings are one byte buffer and one offset array that
reading never writes, so every worker keeps sharing them. `benchmarks/worker_memory.py` measures it.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator, Sequence

import numpy as np


class PackedStrings(Sequence[str]):
    """An immutable list of str in a UTF-8 buffer and offsets: `len`, indexing (one item or a slice), iteration."""

    def __init__(self, items: Iterable[str]):
        # surrogatepass: a Linux file name that is not UTF-8 reaches Python as lone surrogates, and must survive.
        encoded = [item.encode("utf-8", "surrogatepass") for item in items]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(item) for item in encoded], out=self._offsets[1:])
        self._buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        count = len(self)
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise IndexError(f"index {index} out of range for {count} strings")
        return self._buffer[self._offsets[index]:self._offsets[index + 1]].tobytes().decode("utf-8", "surrogatepass")

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    @classmethod
    def from_arrays(cls, offsets: np.ndarray, buffer: np.ndarray) -> PackedStrings:
        """The strings `arrays()` gave, without encoding them again."""
        packed = cls(())
        packed._offsets, packed._buffer = offsets, buffer
        return packed

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, UTF-8 buffer): what `from_arrays` takes back, to store on disk."""
        return self._offsets, self._buffer


class PackedLists(Sequence[list[str]]):
    """An immutable list of lists of str (each record's captions), packed the same way."""

    def __init__(self, items: Iterable[Sequence[str]]):
        self._packed = PackedStrings(json.dumps(list(item)) for item in items)  # ASCII escapes keep any str

    def __len__(self) -> int:
        return len(self._packed)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [json.loads(text) for text in self._packed[index]]
        return json.loads(self._packed[index])

    def __iter__(self) -> Iterator[list[str]]:
        return (json.loads(text) for text in self._packed)

    @classmethod
    def from_arrays(cls, offsets: np.ndarray, buffer: np.ndarray) -> PackedLists:
        packed = cls(())
        packed._packed = PackedStrings.from_arrays(offsets, buffer)
        return packed

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self._packed.arrays()
