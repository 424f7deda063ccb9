"""Which attention kernel the trained models run: `training.attention`."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from difftrain.errors import ConfigError
from difftrain.training.hardware import cpu_computes_bf16

# Up to this many query tokens, diffusers' classic kernel (matmul, softmax, matmul) beat torch's
# SDPA under bf16 on a CPU with bf16 arithmetic by 1.2-2.6x, forward and backward, at 64-256 tokens
# and head sizes 10-96; from 1,024 tokens SDPA was faster (x0.7-0.9). Where the CPU emulates bf16
# (AVX2), SDPA was the faster at every shape (x0.21-0.83 of the classic kernel's time).
# benchmarks/attention_kernels.py.
CPU_BF16_CLASSIC_MAX_TOKENS = 256


class AutoAttention:
    """torch's SDPA, except short sequences under bf16 autocast on a CPU with bf16 arithmetic, which go
    to the classic kernel.

    There torch's bf16 SDPA kernel is slow for short sequences with small heads (9.1 ms against
    3.6 ms for a layer of the demo's, 64 tokens of 4 heads of 24, forward and backward): the demo's
    training loop runs x1.12 faster with the classic kernel (attention_kernels.py). The choice is
    per call and depends only on the device, the autocast dtype, the sequence length and the CPU's
    instruction set, so a run and its resume on the same machine pick the same kernel. In fp32, on a
    CPU that emulates bf16 and on a GPU it is plain SDPA.
    """

    def __init__(self):
        self.sdpa, self.classic = AttnProcessor2_0(), AttnProcessor()
        # Asked once, here: torch.compile cannot trace torch.cpu's probes, and a probe inside the call broke
        # every compiled graph at every attention layer (a compiled SD UNet ran largely eager).
        self.cpu_has_bf16 = cpu_computes_bf16()

    # The signature names `temb` because diffusers passes only the keywords a processor declares.
    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states=None,
                 attention_mask=None, temb=None, *args, **kwargs) -> torch.Tensor:
        processor = self.classic if self.cpu_has_bf16 and _short_cpu_bf16(hidden_states) else self.sdpa
        return processor(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)


def _short_cpu_bf16(hidden_states: torch.Tensor) -> bool:
    if hidden_states.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[-2] * hidden_states.shape[-1]
    return torch.get_autocast_dtype("cpu") == torch.bfloat16 and tokens <= CPU_BF16_CLASSIC_MAX_TOKENS


def set_attention(name: str, module: torch.nn.Module, attention: str) -> None:
    """Give every diffusers attention layer in `module` the kernel `attention` names.

    Layer by layer rather than through `set_attn_processor`, which UNet2DModel (the pixel
    models) does not have.
    """
    layers = [layer for layer in module.modules() if isinstance(layer, Attention)]
    if not layers:  # a transformers text encoder: its attention is its own
        return
    if attention == "xformers":
        try:
            module.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as exc:
            raise ConfigError(
                f"training.attention = xformers: cannot use it for {name} ({exc}); "
                "install xformers for your torch/CUDA, or use sdpa (as fast on torch 2)"
            ) from None
        return
    make = {"auto": AutoAttention, "sdpa": AttnProcessor2_0, "default": AttnProcessor}[attention]
    for layer in layers:
        layer.set_processor(make())
