"""Attaching LoRA adapters (through peft) to a UNet or a text encoder, with clear errors."""

from __future__ import annotations

import logging

import torch

from difftrain.errors import ConfigError

PEFT_INIT = {"default": True, "gaussian": "gaussian"}
ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")

log = logging.getLogger(__name__)


def warn_partial_open_clip_attention(text_encoder, targets: list[str]) -> bool:
    """SD 2.x's OpenCLIP keeps q, k and v in one matrix (its LDM file, what A1111 and ComfyUI load): A1111 applies
    an attention LoRA there only when q, k, v and out are all trained, and skips it silently otherwise."""
    from difftrain.sampling.prompts import is_open_clip

    chosen = [target for target in ATTENTION if target in targets]
    if not chosen or len(chosen) == len(ATTENTION) or not is_open_clip(text_encoder):
        return False
    log.warning("lora.text_encoder_targets trains %s of SD 2.x's attention: AUTOMATIC1111 applies a text-encoder "
                "LoRA on SD 2.x only where q_proj, k_proj, v_proj and out_proj are all trained, and would skip these "
                "layers; train all four (the default) for the LoRA to act the same there", ", ".join(chosen))
    return True


def warn_kohya_text_encoder_layout(targets: list[str]) -> bool:
    """diffusers reads a kohya-layout LoRA (lora.safetensors) as kohya's only when its text-encoder part has the
    attention's output layer, which sd-scripts always trains: without out_proj, load_lora_weights refuses the file
    or drops its q/v layers."""
    if "out_proj" in targets:
        return False
    log.warning("lora.text_encoder_targets leave out out_proj: diffusers' load_lora_weights misreads the kohya-layout "
                "lora.safetensors without it (A1111 and ComfyUI read it); load pytorch_lora_weights.safetensors in "
                "diffusers, or add out_proj")
    return True


def add_lora(
    module: torch.nn.Module, targets: list[str], name: str, rank: int, alpha: float | None, dropout: float, init: str
) -> None:
    """Freeze `module` and add a trainable LoRA on the layers named `targets` (alpha None: alpha = rank)."""
    from peft import LoraConfig as PeftLoraConfig

    def matches(target: str) -> list[torch.nn.Module]:
        return [m for n, m in module.named_modules() if n == target or n.endswith(f".{target}")]

    layer_types = (torch.nn.Linear, torch.nn.Conv2d)
    found = {t: matches(t) for t in targets}
    unknown = [t for t in targets if not found[t]]
    # peft also wraps embeddings, and refuses attention blocks or norms deep inside; a LoRA file holds Linear and
    # Conv2d layers only, so anything else would train for the whole run and then fail to save.
    other = {t: sorted({type(m).__name__ for m in found[t] if not isinstance(m, layer_types)}) for t in targets}
    other = {t: kinds for t, kinds in other.items() if kinds}
    if unknown or other:
        layers = [n.split(".") for n, m in module.named_modules() if isinstance(m, layer_types)]
        leaves = sorted({".".join(p[-2:]) if p[-1].isdigit() else p[-1] for p in layers})
        key = "lora.unet_targets" if name == "unet" else "lora.text_encoder_targets"
        problem = (f"no layer of the {name} is called {unknown}" if unknown else
                   "; ".join(f"{t} is of type {', '.join(kinds)}, not Linear or Conv2d" for t, kinds in other.items()))
        raise ConfigError(f"{key}: {problem}; its Linear/Conv2d layers are named {', '.join(leaves[:30])}")
    module.requires_grad_(False)
    module.add_adapter(
        PeftLoraConfig(
            r=rank,
            lora_alpha=alpha or rank,
            lora_dropout=dropout,
            init_lora_weights=PEFT_INIT[init],
            target_modules=list(targets),
        )
    )
