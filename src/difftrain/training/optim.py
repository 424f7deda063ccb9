"""Optimizer, learning-rate schedule and the per-module speed/memory switches from the training config."""

from __future__ import annotations

import os
import shutil

import torch
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler

from difftrain.config import RunConfig, Text2ImageRun, TrainingConfig
from difftrain.training.attention import set_attention
from difftrain.training.hardware import cpu_computes_bf16
from difftrain.training.muon import MuonWithAdamW, fits_fused_adamw, split_for_muon


def build_optimizer(groups: list[dict], training: TrainingConfig,
                    modules: dict[str, torch.nn.Module]) -> torch.optim.Optimizer:
    """AdamW (or Muon with AdamW) over parameter groups (each may carry its own `lr`) of these trained modules."""
    kwargs = dict(
        lr=training.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        eps=training.adam_epsilon,
        weight_decay=training.weight_decay,
    )
    if training.optimizer == "adamw_8bit":  # (the config refuses it where bitsandbytes is not installed)
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(groups, **kwargs)
    if training.optimizer == "muon":
        return MuonWithAdamW(split_for_muon(groups, modules), **kwargs)
    params = [p for group in groups for p in group["params"]]
    # Under fp16 GradScaler hands a fused AdamW the overflow check and calls its step every time, so accelerate
    # cannot tell a skipped step (huggingface/accelerate#4242): the LR schedule and EMA would advance on it.
    fused = fits_fused_adamw(params) and training.mixed_precision != "fp16"
    return torch.optim.AdamW(groups, fused=fused or None, **kwargs)


def clip_gradients(accelerator, parameters: list[torch.nn.Parameter], max_norm: float) -> None:
    """accelerate's clip_grad_norm_, except where the gradients are whole on a CPU: there the norm is
    on the host already, so gradients within `max_norm` are left as they are instead of multiplied by
    1.0 (torch multiplies always, to spare a GPU the sync). Bit for bit the same gradients; one pass
    over them less: 11 against 20 ms a step for SD 1.5's UNet at a quarter width on this project's CPU
    (`benchmarks/optimizer_step.py`). The demo's gradients stayed within its 1.0 in all of its first 400
    steps (a one-off check, norms 0.16-0.33)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        # accelerate's FSDP clipping looks for one model holding exactly these parameters; with two trained (UNet
        # and text encoder) it finds none and unscales fp16 gradients a second time, which GradScaler refuses.
        # torch's own clipping takes the sharded (DTensor) gradients of one mesh as they are.
        accelerator.unscale_gradients()
        torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        return
    if accelerator.device.type != "cpu" or accelerator.distributed_type not in (DistributedType.NO,
                                                                                 DistributedType.MULTI_CPU):
        accelerator.clip_grad_norm_(parameters, max_norm)
        return
    accelerator.unscale_gradients()
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if max_norm / (norm + 1e-6) < 1:  # torch's own coefficient, which it clamps to 1
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)


def build_lr_schedule(optimizer: torch.optim.Optimizer, training: TrainingConfig):
    # Counted in optimizer steps: the loop calls step() once per update, whatever the
    # accumulation or the number of processes.
    return get_scheduler(
        training.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=training.lr_warmup_steps,
        num_training_steps=training.max_steps,
        num_cycles=training.lr_num_cycles,
        power=training.lr_power,
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


# On a CPU inductor pays where autocast's casts and the elementwise work between the matmuls are a
# real share of the step, and a run is long enough to earn the compile back. SD 1.5's UNet at a
# quarter width, 128 px, batch 4, bf16, 2 CPU cores, 2026-12-06 (once the attention kernel choice no
# longer broke the graph at every layer), two runs: x1.13-1.23 a step cached (46-92 ms saved of
# ~400-500), x1.10-1.21 uncached, for 234 s of cold compiling (~40 s from the kernel cache), earned
# back after 2,500-5,100 steps (~3,400 at the mean); 5,000 leaves room for the slower runs. In fp32,
# without inductor's layout optimization (_training_compile_options), the same step ran x1.10 cached and
# x1.01 uncached in one run on that CPU; on an AVX2 CPU, where `auto` means fp32, x1.19 / x1.09 in one run
# and x0.96 / x0.94 in the next, an hour apart, for 300 s of cold compiling (2026-12-06/07, README): fp32
# stays eager. The demo's pixel UNet gained x1.03-1.06 (bf16, 2026-12-05): too little for its short runs.
CPU_COMPILE_MIN_STEPS = 5_000


def resolve_compile(config: RunConfig, precision: str, recorded: bool | None = None) -> bool:
    """Whether the trained modules run through torch.compile (`precision`: the autocast that runs).

    `auto` compiles on a CUDA GPU for runs long enough to earn the compile time back (a minute or
    two for an SD UNet). On a CPU, only a whole Stable Diffusion UNet trained under bf16 at one
    image size (no buckets) for CPU_COMPILE_MIN_STEPS or more (measured above), where a C++
    compiler is installed. A resumed `auto` run keeps the choice its checkpoint `recorded`:
    compiled and eager kernels round differently, and resume is exact.
    """
    training = config.training
    if training.compile != "auto":
        return bool(training.compile)
    if recorded is not None:
        return recorded
    if torch.cuda.is_available():
        return training.max_steps >= 1000
    whole_unet_alone = (isinstance(config, Text2ImageRun) and not config.lora.enabled
                        and not config.trains_text_encoder)
    one_shape = not config.data.buckets.enabled  # measured at one shape; each bucket's shape compiles again
    return (precision == "bf16" and whole_unet_alone and one_shape and training.max_steps >= CPU_COMPILE_MIN_STEPS
            and _has_cpp_compiler())


def _has_cpp_compiler() -> bool:
    """Inductor writes C++ for a CPU: without a compiler the run would fail at its first step."""
    return any(shutil.which(name) for name in (os.environ.get("CXX"), "g++", "clang++", "c++") if name)


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
    return "bf16" if cpu_computes_bf16() else "no"


def compile_modules(modules: dict[str, torch.nn.Module], scope: str = "model") -> list[str]:
    """Compile in place: the modules keep their class, parameter names and state-dict keys,
    so checkpoints, EMA and saving see no wrapper. Kernels go to difftrain's cache, kept across runs.

    `scope` "blocks" compiles only the blocks a diffusers model repeats (diffusers' regional compilation:
    one compile per block shape, reused by every block of that shape); a module without them is compiled
    whole. Returns what was compiled, a phrase per module, for the run summary.
    """
    from accelerate.utils import extract_model_from_parallel

    from difftrain.cache import prepare_compile

    prepare_compile()
    compiled = []
    for name, module in modules.items():
        model = extract_model_from_parallel(module, keep_torch_compile=False)  # DDP and FSDP wrap the model
        options = _training_compile_options(model)
        blocks = set(getattr(model, "_repeated_blocks", None) or ()) if scope == "blocks" else set()
        # By the classes' ancestry, not the class name alone (diffusers' compile_repeated_blocks): FSDP 2 turns
        # each block it wraps into a subclass named FSDP<name>.
        kinds = {sub: blocks & {c.__name__ for c in type(sub).__mro__} for sub in model.modules()}
        found = [sub for sub, kind in kinds.items() if kind]
        if found:
            for sub in found:
                sub.compile(options=options)
            compiled.append(f"{name}: {len(found)} {'/'.join(sorted(set().union(*kinds.values())))} blocks")
        else:
            module.compile(options=options)
            compiled.append(f"{name} whole")
    return compiled


def _training_compile_options(model: torch.nn.Module) -> dict:
    """Inductor's settings for compiling `model` to train.

    On a CPU inductor computes every convolution in channels_last (its layout optimization), so the
    weight gradients of the 3x3 convolutions come out channels_last too, and autograd copies each into
    its contiguous parameter's layout every step: ~33 ms of a ~400 ms cached SD-quarter step in bf16
    (`benchmarks/profile_step.py --cache --compile model`). Without the optimization that step ran
    x1.05-1.12 faster in three runs (`benchmarks/compile_layout.py`, 2026-12-06); a graph pass that kept
    channels_last and handed autograd contiguous gradients instead ran x0.92 of it (a one-off run).
    A GPU keeps inductor's choice (not measured there).
    """
    parameter = next(model.parameters(), None)
    return {"layout_optimization": False} if parameter is not None and parameter.device.type == "cpu" else {}
