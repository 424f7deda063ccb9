"""Keep the memory a training step frees for the next step, instead of handing it back to the OS.

glibc's malloc returns freed blocks to the kernel: blocks above its mmap threshold (128 KiB at
first, growing with what is freed, 32 MiB at most) are unmapped on free, and free memory at the
top of the heap is trimmed once it passes the trim threshold. A training step on a CPU frees
and allocates the same activations and gradients every step, so every step faults them back in,
page by page, the kernel zeroing each page. On this project's 2-core CPU
(`benchmarks/profile_step.py --keep-host-memory false`): text2image at 128 px ~24,000 page faults
and ~47 ms of system time a step under bf16 (~10,600 and ~30 ms in fp32), the demo's step ~5,500
and ~9 ms. Raising both thresholds keeps the blocks in the process, as a caching allocator
(PyTorch's own on CUDA; jemalloc or tcmalloc preloaded, as PyTorch's CPU tuning guide
recommends) would; the price is that the process's resident size stays at its peak.

`mallopt` is process-wide and cannot be undone (setting a threshold switches glibc's dynamic
threshold off for good), so runs set it only where it pays, training on a CPU, and it stays for
the rest of the process.
"""

from __future__ import annotations

import ctypes
import platform

import torch

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
MMAP_THRESHOLD = 1 << 30  # blocks above 1 GiB are still mapped and unmapped on their own
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: keep up to 2 GiB of free heap top


_kept = False  # whether this process's thresholds were raised: there is no going back
KEPT = "kept for the next step"


def configure(setting: bool | str, device: torch.device) -> str:
    """Apply `training.keep_host_memory` for a run on `device`; returns what the run summary says."""
    global _kept
    if wanted(setting, device):
        refused = _raise_thresholds()
        if refused:
            return f"returned to the OS ({refused})"
        _kept = True
        return f"{KEPT} (glibc malloc thresholds raised; resident size stays at its peak)"
    if _kept:
        return f"{KEPT} (an earlier run in this process raised glibc's thresholds: that is one-way)"
    return "returned to the OS (malloc's defaults)"


def wanted(setting: bool | str, device: torch.device) -> bool:
    """`training.keep_host_memory`: auto = on when the trained modules run on the CPU."""
    return device.type == "cpu" if setting == "auto" else bool(setting)


def _raise_thresholds() -> str | None:
    """Raise glibc's mmap and trim thresholds for this process; None when done, else why not."""
    if platform.libc_ver()[0] != "glibc":
        return f"not glibc's malloc, {platform.system()}: nothing to tune"
    libc = ctypes.CDLL(None)  # the process's own symbols, glibc's mallopt among them
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "glibc refused the malloc thresholds"
    return None
