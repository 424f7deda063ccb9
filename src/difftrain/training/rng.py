"""Capturing and restoring every random number generator a process uses, as tensors.

Stored with safetensors rather than pickle, so loading a checkpoint never runs code.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def capture(noise_generator: torch.Generator) -> dict[str, torch.Tensor]:
    state = {
        "torch": torch.get_rng_state(),
        "noise": noise_generator.get_state(),
    }
    _, python_keys, python_gauss = random.getstate()
    state["python"] = torch.tensor(python_keys, dtype=torch.int64)
    state["python_gauss"] = torch.tensor(
        [python_gauss is not None, python_gauss or 0.0], dtype=torch.float64
    )
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy_keys"] = torch.from_numpy(keys.astype(np.int64))
    state["numpy_pos"] = torch.tensor([pos, has_gauss], dtype=torch.int64)
    state["numpy_gauss"] = torch.tensor([gauss], dtype=torch.float64)
    for name, backend in _accelerators():
        state[name] = backend.get_rng_state()
    return state


def _accelerators():
    """(name, torch module) of each accelerator this process can use: its generator draws dropout's masks."""
    for name in ("cuda", "xpu", "mps"):
        backend = getattr(torch, name, None)
        if backend is not None and backend.is_available():
            yield name, backend


def restore(state: dict[str, torch.Tensor], noise_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    noise_generator.set_state(state["noise"])
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), gauss if has_gauss else None))
    pos, numpy_has_gauss = (int(v) for v in state["numpy_pos"].tolist())
    numpy_keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", numpy_keys, pos, numpy_has_gauss, float(state["numpy_gauss"][0])))
    for name, backend in _accelerators():
        if name in state:
            backend.set_rng_state(state[name])
