"""DeepSpeed ZeRO (stages 1, 2 and 3, through accelerate): the few places the loop must know of it.

Each process keeps its partition (1/N) of the fp32 master weights and Adam's moments, at stage 2
of the gradients too, and at stage 3 of the weights themselves. What changes for difftrain:

- The run config is the one source of the batch size, gradient accumulation and clipping:
  `configure` writes them into DeepSpeed's config, so the accelerate YAML cannot disagree.
- `accelerator.backward` runs DeepSpeed's backward *and* its step (clipping included);
  the loop's own `optimizer.step()` and `clip_grad_norm_` are no-ops there.
- Checkpoints: `model.safetensors` and `ema.safetensors` are whole, as in any run (at stage 3 every
  process takes part in gathering them, one parameter at a time, and rank 0 writes them), so
  `difftrain sample` reads a checkpoint as it is. Each process writes its partition of the
  optimizer (`optimizer-rank{R}.safetensors`, its layout in `optimizer-rank{R}.json`); resume
  needs the same number of processes.
- At stage 3 the EMA is partitioned like the weights (each process averages its own partition),
  and samples, evaluation and the final model come from a plain copy rank 0 builds from the
  gathered weights, as under FSDP.
- accelerate drops a DeepSpeed config on a machine without a GPU (as it drops FSDP);
  DeepSpeed runs on CPU processes over gloo, so `honour_on_cpu` keeps what was asked for.

DeepSpeed's own `save_checkpoint` pickles its state (torch.save); we keep checkpoints
safetensors + JSON, through ZeRO's own `state_dict`/`load_state_dict`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from difftrain.atomic import write_text
from difftrain.training.checkpoint import load_tensors, optimizer_from_parts, optimizer_to_parts, save_tensors
from difftrain.training.ema import trained_parameters
from difftrain.training.sharding import (
    ShardingError,
    check_rebuildable,
    copy_holding,
    part_file,
    plain_name,
    refuse_adapters,
)
from difftrain.training.sharding import state_bytes as sharding_state_bytes

# What of ZeRO's optimizer state dict is plain data (JSON); its tensors go to safetensors. Left out:
# the loss scaler object (its numbers are kept apart) and the universal-checkpoint slice maps.
_PLAIN = ("dynamic_loss_scale", "overflow", "clip_grad", "group_paddings", "param_alignment_paddings",
          "partition_count", "ds_version")
# Per stage, the keys of ZeRO's state dict holding the torch optimizer's state and the fp32 master partitions.
_KEYS = {1: ("base_optimizer_state", "single_partition_of_fp32_groups"),
         2: ("base_optimizer_state", "single_partition_of_fp32_groups"),
         3: ("optimizer_state_dict", "fp32_flat_groups")}
_SCALER = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


class ZeroError(ShardingError):
    pass


def requested() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_installed() -> None:
    """Before the Accelerator exists (accelerate's own message names no extra)."""
    if requested() and importlib.util.find_spec("deepspeed") is None:
        raise ZeroError("this run was launched with a DeepSpeed config but deepspeed is not installed: "
                        "pip install -e '.[deepspeed]' (or use configs/accelerate/fsdp_*.yaml, which need nothing more)")


def honour_on_cpu(accelerator: Accelerator) -> None:
    """Run DeepSpeed on CPU processes (gloo) when the launch asked for it; accelerate would silently not."""
    from accelerate.utils import DeepSpeedPlugin

    state = AcceleratorState()
    if not requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* settings `accelerate launch` exported
    plugin.set_mixed_precision(accelerator.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state._mixed_precision = "no"  # DeepSpeed casts itself (its bf16 section); accelerate must not autocast too
    accelerator.native_amp = False
    state.distributed_type = DistributedType.DEEPSPEED
    # As for FSDP: each later AcceleratorState() copies PartialState's fields over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    # DeepSpeed's CPU all-reduce op is C++ it compiles on first use (about 40 s on 2 cores, in every fresh
    # environment); gloo carries the reduction instead, as it does for DDP and FSDP on CPU. That op is the one
    # DeepSpeed looks up in this table, which it would otherwise fill by probing the compiler for every op it
    # knows (1.4 s a process).
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {"deepspeed_shm_comm": False}


def is_zero(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.DEEPSPEED


def configure(accelerator: Accelerator, config) -> int:
    """Before any model loads: refuse what ZeRO cannot run here and make DeepSpeed's config follow the
    run config. Returns the ZeRO stage."""
    plugin = accelerator.state.deepspeed_plugin
    stage = int(plugin.zero_stage)
    if stage == 3:
        if plugin.zero3_init_flag:
            raise ZeroError("zero3_init_flag: true would partition every model transformers loads, the frozen text "
                            "encoder too, which then cannot run outside DeepSpeed's engine; set zero3_init_flag: "
                            "false in the accelerate config (the trained module is partitioned when training starts)")
        # accelerate registers its DeepSpeed config with transformers at any stage; at stage 3 transformers then
        # partitions every model it loads (zero.Init) whatever zero3_init_flag says. The frozen models must load whole.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    refuse_adapters(config, "ZeRO partitions the optimizer state")
    ds, training = plugin.deepspeed_config, config.training
    _refuse_unsupported(training, ds.get("zero_optimization", {}))
    ds["train_micro_batch_size_per_gpu"] = training.batch_size
    ds["gradient_accumulation_steps"] = training.gradient_accumulation_steps
    ds["train_batch_size"] = training.batch_size * training.gradient_accumulation_steps * accelerator.num_processes
    ds["gradient_clipping"] = float(training.max_grad_norm or 0.0)
    accelerator.gradient_accumulation_steps = training.gradient_accumulation_steps  # else the YAML's wins, with a warning
    # Our optimizers (AdamW, 8-bit AdamW) are ordinary torch optimizers; ZeRO only slices what they see.
    ds["zero_allow_untested_optimizer"] = True
    ds["zero_force_ds_cpu_optimizer"] = False
    return stage


def _refuse_unsupported(training, zero_config: dict) -> None:
    """What the run config asks of ZeRO that difftrain does not run under it, refused with what to use instead."""
    if training.mixed_precision not in ("no", "auto"):  # auto is fp32 under DeepSpeed (optim.resolve_precision)
        # accelerate drops its autocast under DeepSpeed and DeepSpeed casts the module itself: the frozen models'
        # outputs and the saved weights would then be in another dtype than under DDP/FSDP. Not run here yet.
        raise ZeroError(f"training.mixed_precision: {training.mixed_precision} under DeepSpeed is not supported yet "
                        "(only fp32 was run); set it to 'no', or train with FSDP, which keeps fp32 weights with "
                        f"{training.mixed_precision} compute (configs/accelerate/fsdp_shard_grad_op.yaml)")
    if training.compile is True:
        raise ZeroError("training.compile: true under DeepSpeed is not supported (DeepSpeed's engine compiles by "
                        "its own rules); set it to auto or false")
    offload = {key: zero_config.get(key, {}).get("device", "none") for key in ("offload_optimizer", "offload_param")}
    if "nvme" in offload.values():
        raise ZeroError("DeepSpeed's NVMe offload swaps the optimizer state out of the tensors difftrain's checkpoints "
                        "and EMA read; offload to cpu (or none) instead")
    if training.optimizer == "adamw_8bit" and offload["offload_optimizer"] != "none":
        raise ZeroError("training.optimizer: adamw_8bit needs its state on the GPU, and this config offloads it to "
                        "the CPU; use adamw, or set offload_optimizer_device: none")


def check_trainable(modules: dict[str, torch.nn.Module], stage: int) -> None:
    if len(modules) > 1:
        raise ZeroError(f"DeepSpeed trains one module per run and this config trains {len(modules)} "
                        f"({', '.join(modules)}); train only one (e.g. dreambooth.train_text_encoder: false) or "
                        "launch with configs/accelerate/ddp.yaml or fsdp_full_shard.yaml")
    if stage == 3:
        check_rebuildable(modules, "ZeRO-3")


def _zero_optimizer(optimizer):
    return optimizer.optimizer  # accelerate's DeepSpeedOptimizerWrapper around ZeRO's optimizer


def masters(optimizer) -> list[torch.Tensor]:
    """This process's fp32 master partitions (what ZeRO's optimizer steps)."""
    zero = _zero_optimizer(optimizer)
    found = getattr(zero, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    return list(found if found is not None else zero.single_partition_of_fp32_groups)


def save_optimizer(optimizer, folder: Path, rank: int) -> None:
    """Write this process's partition of the optimizer: its tensors as safetensors, the rest as JSON."""
    zero, path = _zero_optimizer(optimizer), folder / part_file("optimizer", rank)
    state = zero.state_dict()
    stage = int(state["zero_stage"])
    base_key, masters_key = _KEYS[stage]
    tensors, base = optimizer_to_parts(state[base_key])
    tensors.update({f"master.{i}": t for i, t in enumerate(state[masters_key])})
    rest = {"base": base, "zero_stage": stage, **{key: state[key] for key in _PLAIN if key in state},
            "loss_scaler": {key: getattr(zero.loss_scaler, key) for key in _SCALER if hasattr(zero.loss_scaler, key)}}
    save_tensors(path, tensors)
    write_text(path.with_suffix(".json"), json.dumps(rest, indent=1), sync=False)


def load_optimizer(optimizer, folder: Path, rank: int, world_size: int) -> None:
    """Give ZeRO's optimizer back this process's partition (fp32 masters, moments, loss scale); at stage 3
    that restores the weights too (ZeRO-3 refreshes its weight partitions from the masters)."""
    zero, path = _zero_optimizer(optimizer), folder / part_file("optimizer", rank)
    tensors = load_tensors(path)
    rest = json.loads(path.with_suffix(".json").read_text())
    base_key, masters_key = _KEYS[rest["zero_stage"]]
    count = sum(key.startswith("master.") for key in tensors)
    state = {key: rest[key] for key in _PLAIN if key in rest}
    state[masters_key] = [tensors.pop(f"master.{i}") for i in range(count)]
    state[base_key] = optimizer_from_parts(tensors, rest["base"])
    state.update(zero_stage=rest["zero_stage"], loss_scaler=zero.loss_scaler)
    # ZeRO reads the entry of this process's data-parallel rank (the others are for changing the world size).
    # It also takes back the saved clip_grad, over this run's max_grad_norm (which a resume may change): kept.
    clip = getattr(zero, "clip_grad", None)
    zero.load_state_dict([state if r == rank else None for r in range(world_size)],
                         load_optimizer_states=True, load_from_fp32_weights=True)
    if clip is not None:
        zero.clip_grad = clip
    for key, value in rest["loss_scaler"].items():
        setattr(zero.loss_scaler, key, value)
    if hasattr(zero, "checkpoint_event_epilogue"):  # ZeRO-3: gather the parameters it keeps whole, as after a step
        zero.checkpoint_event_epilogue()


def state_bytes(modules: dict[str, torch.nn.Module], optimizer, stage: int) -> int:
    """Bytes this process holds of trained weights (see `held_parameters`), fp32 master partitions and
    optimizer slots."""
    held = [t for m in modules.values() for t in held_parameters(m, stage)] + masters(optimizer)
    return sharding_state_bytes(held, _zero_optimizer(optimizer).optimizer)


# ----------------------------------------------------------------- ZeRO-3: the weights are partitioned
def held_parameters(module: torch.nn.Module, stage: int) -> list[torch.Tensor]:
    """The trained weights this process holds: all of them, or at stage 3 its partitions plus the whole of any
    parameter DeepSpeed keeps gathered (those under stage3_param_persistence_threshold, 1e5 elements)."""
    if stage != 3:
        return trained_parameters(module)
    return partition_views(module) + [p.data for p in trained_parameters(module) if p.data.numel()]


def partition_views(module: torch.nn.Module) -> list[torch.Tensor]:
    """At stage 3, this process's partition of each trained parameter, as leaves sharing the partition's
    memory (made afresh each call: ZeRO-3 may give a partition new storage)."""
    return [p.ds_tensor.detach().requires_grad_() for p in trained_parameters(module)]


def partitions(module: torch.nn.Module, whole: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Of each whole tensor (by trained parameter name), this process's ZeRO-3 partition: the flat tensor's
    slice [rank * n, (rank + 1) * n) in the parameter's process group, zero-padded at the end, as DeepSpeed
    partitions a parameter."""
    held = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            n, rank = p.ds_tensor.numel(), p.ds_zero_partition_rank
            flat = whole[plain_name(name)].flatten()
            flat = torch.nn.functional.pad(flat, (0, n * p.ds_zero_partition_world_size - flat.numel()))
            held[plain_name(name)] = flat[rank * n:(rank + 1) * n]
    return held


def _whole(p: torch.nn.Parameter, device: torch.device) -> torch.Tensor:
    """A ZeRO-3 parameter whole, all-gathered from every process's partition (its ds_tensor: what the optimizer
    and the EMA swap write). Not DeepSpeed's GatheredParameters: it skips the parameters DeepSpeed keeps gathered
    (stage3_param_persistence_threshold), whose gathered copy still holds the trained weights while the EMA is
    swapped into the partitions."""
    part = p.ds_tensor.detach().to(device)
    pieces = [torch.empty_like(part) for _ in range(p.ds_zero_partition_world_size)]
    torch.distributed.all_gather(pieces, part, group=p.ds_process_group)
    return torch.cat(pieces)[:p.ds_numel].view(p.ds_shape)


def gathered_state(module: torch.nn.Module, keep: bool, device: torch.device,
                   trained_only: bool = True) -> dict[str, torch.Tensor]:
    """A ZeRO-3 module's weights whole, in CPU memory, for the process with `keep` (the others get {}).
    Every process must call it: each parameter is gathered from all of them, one at a time, so no process
    ever holds more than one whole parameter beyond what it keeps."""
    whole = {}
    for name, p in module.named_parameters():
        if trained_only and not p.requires_grad:
            continue
        tensor = _whole(p, device)
        if keep:
            whole[plain_name(name)] = tensor.to("cpu", copy=True)
    return whole


def plain_copy(module: torch.nn.Module, keep: bool, device: torch.device) -> torch.nn.Module | None:
    """An unpartitioned copy of a ZeRO-3 module for rank 0 to sample from and save (every process must
    call it; those with `keep` False get None). A copy, not the module gathered in place: the module's
    forward hooks would fetch partitions collectively while only rank 0 samples."""
    weights = gathered_state(module, keep, device, trained_only=False)
    if not keep:
        return None
    buffers = {k: v for k, v in module.state_dict().items() if k not in weights}  # never partitioned
    return copy_holding(module, {**weights, **buffers}, device)
