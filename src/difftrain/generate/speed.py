"""The torch backend's speed switches beyond precision: fused QKV projections, torch.compile of the
UNet and the VAE decoder with its kernels kept across runs, and CUDA graphs.

Each changes how fast an image comes, never which image: tests hold the fused and compiled
pipelines to the plain one's images on the CPU. The speed itself shows on a GPU.
"""

from __future__ import annotations

import os

from difftrain.cache import prepare_compile
from difftrain.errors import DifftrainError

COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The modes that record CUDA graphs, each with its twin without them (the VAE decoder's: it runs once an
# image, so graphs would hold a memory pool for it and save nothing).
_CUDA_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def resolve_compile_mode(mode: str, device) -> str:
    """`auto`: CUDA graphs on a GPU (a UNet step is many small kernels whose launches they remove); plain elsewhere."""
    if mode != "auto":
        return mode
    return "reduce-overhead" if device.type == "cuda" else "default"


def compile_pipeline(pipe, mode: str) -> None:
    """Compile the UNet and the VAE decoder in `mode` (each compiles on its first call)."""
    import torch

    prepare_compile()
    pipe.unet = torch.compile(pipe.unet, mode=mode)
    if mode in _CUDA_GRAPH_MODES:
        # A CUDA graph writes each call's output into the same buffer. A scheduler that keeps the
        # raw prediction past the next call (x0-predicting models under DPM++) would read it overwritten.
        pipe.unet.register_forward_hook(_own_output)
    pipe.vae.decoder = torch.compile(pipe.vae.decoder, mode=_CUDA_GRAPH_MODES.get(mode, mode))


def _own_output(module, args, output):
    if isinstance(output, tuple):
        return (output[0].clone(), *output[1:])
    output.sample = output.sample.clone()
    return output


def compile_report() -> str:
    """What compiling cost this process and how much of it the kernel cache saved."""
    from torch._dynamo.utils import compile_times, counters

    names, seconds = compile_times(repr="csv", aggregate=True)
    spent = float(dict(zip(names, seconds)).get("_compile.compile_inner", 0.0))
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    return (f"torch.compile: {spent:.1f} s compiling; {hits} of {hits + misses} graph(s) from the kernel cache "
            f"in {os.environ['TORCHINDUCTOR_CACHE_DIR']} (a later run reuses what this one compiled)")


def fuse_qkv(pipe, requested: bool | None, device, attention_slicing: bool) -> bool:
    """Fuse each attention's query, key and value projections into one matmul (diffusers' own fusion).

    Default on a GPU, where three small GEMMs become one. LoRA adapters sit on the separate
    projections, so a pipeline carrying them stays unfused, and asking for fusion then is refused.
    """
    adapters = bool(getattr(pipe.unet, "peft_config", None))
    if requested is None:
        requested = device.type == "cuda" and not adapters and not attention_slicing
    elif requested and adapters:
        raise DifftrainError("--fuse-qkv: the LoRA adapters loaded act on the separate query/key/value projections "
                             "and fusing them would drop the LoRA; bake it in first (difftrain lora merge) "
                             "or leave out --fuse-qkv")
    if requested:
        from diffusers import AutoencoderKL

        pipe.fuse_qkv_projections(vae=isinstance(pipe.vae, AutoencoderKL))
    return requested
