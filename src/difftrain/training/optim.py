"""Optimizer, learning-rate schedule and the per-module speed/memory switches from the training config."""

from __future__ import annotations

import os

import torch
from diffusers.optimization import get_scheduler

from difftrain.config import ConfigError, TrainingConfig
from difftrain.training.attention import set_attention


def build_optimizer(groups: list[dict], training: TrainingConfig) -> torch.optim.Optimizer:
    """AdamW over parameter groups (each may carry its own `lr`)."""
    kwargs = dict(
        lr=training.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        eps=training.adam_epsilon,
        weight_decay=training.weight_decay,
    )
    if training.optimizer == "adamw_8bit":
        try:
            import bitsandbytes
        except ImportError:
            raise ConfigError(
                "training.optimizer = adamw_8bit needs bitsandbytes (pip install bitsandbytes, CUDA only); "
                "or set training.optimizer: adamw"
            ) from None
        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    # torch's fused AdamW does the whole update in one kernel per dtype: on a 54M-parameter
    # UNet on 2 CPU cores it is ~4x faster than the default per-tensor loop (73 ms vs 323 ms
    # a step, benchmarks/optimizer_step.py). Same math, same state dict.
    params = [p for group in groups for p in group["params"]]
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, fused=fusable or None, **kwargs)


def build_lr_schedule(optimizer: torch.optim.Optimizer, training: TrainingConfig):
    # Counted in optimizer steps: the loop calls step() once per update, whatever the
    # accumulation or the number of processes.
    return get_scheduler(
        training.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=training.lr_warmup_steps,
        num_training_steps=training.max_steps,
    )


def apply_speed_options(modules: dict[str, torch.nn.Module], training: TrainingConfig) -> None:
    """Gradient checkpointing, attention kernel and TF32, on whichever modules support them."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = training.allow_tf32
        torch.backends.cudnn.allow_tf32 = training.allow_tf32
    for name, module in modules.items():
        if training.gradient_checkpointing:
            if hasattr(module, "enable_gradient_checkpointing"):  # diffusers models
                module.enable_gradient_checkpointing()
            elif hasattr(module, "gradient_checkpointing_enable"):  # transformers models
                module.gradient_checkpointing_enable()
        set_attention(name, module, training.attention)


def resolve_compile(training: TrainingConfig, recorded: bool | None = None) -> bool:
    """Whether the trained modules run through torch.compile.

    `auto` compiles on a CUDA GPU for runs long enough to earn the compile time back (a
    minute or two for an SD UNet) and never on a CPU: there inductor made the demo's UNet
    step 1.05x faster for 87 s of compiling, break-even after ~10,000 steps, and 0.97x under
    bf16 (benchmarks/demo_levers.py --compile). A resumed `auto` run keeps the choice its
    checkpoint `recorded`: compiled and eager kernels round differently, and resume is exact.
    """
    if training.compile == "auto":
        return recorded if recorded is not None else torch.cuda.is_available() and training.max_steps >= 1000
    return bool(training.compile)


def resolve_precision(training: TrainingConfig, recorded: str | None = None) -> str:
    """The autocast dtype accelerate runs: `auto` is bf16 where the hardware computes in bf16.

    That is a CUDA GPU with bf16 (Ampere and later) or a CPU with AVX512-BF16 or AMX; on such
    a CPU the demo's training loop runs x1.15 the steps/s and its samples are as clean (81 %
    against 73 % of 128 in fp32; benchmarks/demo_levers.py, README). Elsewhere bf16 is emulated
    and slower, so `auto` is fp32 there. Never under DeepSpeed, which casts by itself (zero.py).
    A resumed `auto` run keeps the precision its checkpoint `recorded`, wherever it resumes.
    """
    if training.mixed_precision != "auto":
        return training.mixed_precision
    if recorded in ("no", "fp16", "bf16"):
        return recorded
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "no"
    if torch.cuda.is_available():
        # Without the flag, torch counts a GPU that only emulates bf16 (a T4, a V100) as supporting it.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "no"
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private, hence the getattr
    return "bf16" if any(getattr(torch.cpu, probe, lambda: False)() for probe in probes) else "no"


def compile_modules(modules: dict[str, torch.nn.Module]) -> None:
    """Compile in place: the modules keep their class, parameter names and state-dict keys,
    so checkpoints, EMA and saving see no wrapper. Kernels go to difftrain's cache, kept across runs."""
    from difftrain.cache import use_compile_cache

    use_compile_cache()
    for module in modules.values():
        module.compile()
