"""Fully sharded training (FSDP 2, through accelerate): the few places the loop must know of it.

Under FSDP each process holds 1/N of every trained weight, gradient and optimizer slot:
torch's `fully_shard` turns each parameter into a DTensor split on its first dimension.
What changes for difftrain:

- Checkpoints are written sharded: each process writes the part it holds
  (`model-rank{R}.safetensors`, `ema-...`, `optimizer-...`) and no process ever gathers the
  whole optimizer. `consolidate` joins the parts into the usual unsharded files.
- Samples, evaluation and the final model need whole modules: every process takes part in
  gathering the weights and rank 0 gets a plain, unsharded copy of each module.
- accelerate drops an FSDP config on a machine without a GPU (it then runs plain multi-CPU
  data parallel and says nothing); torch's fully_shard runs over gloo, so
  `honour_fsdp_on_cpu` keeps what the user asked for.

We write our own sharded files rather than torch.distributed.checkpoint's, whose metadata is
a pickle: a checkpoint stays safetensors + JSON and loading one never unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

from difftrain.atomic import write_safetensors, write_text
from difftrain.errors import DifftrainError
from difftrain.run_folder import SHARD_LAYOUT as LAYOUT  # which tensors of the parts are split, over how many



class ShardingError(DifftrainError):
    pass


def launch_asks_for_fsdp() -> bool:
    """What `accelerate launch` with an FSDP config exported, readable before the Accelerator is built."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def reduce_in_fp32(accelerator: Accelerator) -> None:
    """Under FSDP with bf16 or fp16, reduce-scatter gradients in fp32, as DDP reduces them: accelerate's policy
    reduces in the half type, where eight bits of mantissa (bf16) lose the small gradients of a large sum.
    The weights are still gathered and computed in the half type; only the gradient traffic doubles."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    policy = getattr(plugin, "mixed_precision_policy", None)
    if not is_sharded(accelerator) or policy is None or getattr(policy, "reduce_dtype", None) in (None, torch.float32):
        return
    plugin.mixed_precision_policy = dataclasses.replace(policy, reduce_dtype=torch.float32)


def honour_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Run FSDP on CPU processes (gloo) when the launch asked for it; accelerate would silently not."""
    state = AcceleratorState()
    if not launch_asks_for_fsdp() or state.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* settings `accelerate launch` exported
    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    # As accelerate itself does for FSDP: each later AcceleratorState() copies PartialState's fields over its own.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def check_launch() -> None:
    """Refuse an FSDP 1 launch (accelerate's default when the config names no fsdp_version), on any device,
    before the Accelerator is built: on a CPU accelerate itself then fails with a traceback, and on a GPU
    it wraps FSDP 1 modules into flat parameters after the optimizer was built (difftrain builds it before
    `prepare`; only accelerate's FSDP 2 path points it at the new parameters), so nothing would train.
    The checkpoints and rank 0's whole copies here are FSDP 2's (DTensor) too."""
    version = os.environ.get("FSDP_VERSION", "1")  # what `accelerate launch` exports, and the plugin reads
    if launch_asks_for_fsdp() and version != "2":
        raise ShardingError(f"FSDP: this launch asks for fsdp_version {version} (accelerate's default when the config "
                            "names none); difftrain shards with FSDP 2: set fsdp_version: 2 in the accelerate "
                            "config's fsdp_config (configs/accelerate/fsdp_*.yaml do)")


def is_sharded(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type == DistributedType.FSDP


def check_trainable(config, modules: dict[str, torch.nn.Module]) -> None:
    """On every process, before any step: what FSDP cannot train here is refused by all ranks alike (one
    raising alone, at its first sample, would leave the others waiting at the next barrier)."""
    refuse_adapters(config, "FSDP shards whole modules")
    check_rebuildable(modules, "FSDP")


def check_rebuildable(modules: dict[str, torch.nn.Module], engine: str) -> None:
    """Rank 0 samples from and saves a plain copy of each module whose weights are split (see `rebuilt`)."""
    for name, module in modules.items():
        with torch.device("meta"):  # the structure only: no memory, no initialisation
            copy = rebuilt(module)
        if copy.state_dict().keys() != module.state_dict().keys():
            raise ShardingError(f"{engine}: the {name} module rebuilt from its config does not hold the trained one's "
                                f"weights, so rank 0 could not sample from or save it; train it without {engine}")


def refuse_adapters(config, engine: str) -> None:
    """A LoRA or an embedding trains a few MB: sharding its state gains nothing, and those runs are not built for it."""
    lora = getattr(config, "lora", None)
    if (lora is not None and lora.enabled) or config.method == "textual_inversion":
        what = "an embedding" if config.method == "textual_inversion" else "a LoRA"
        raise ShardingError(f"{engine}; {what} run trains a few MB and gains nothing from it. "
                            "Launch it with configs/accelerate/ddp.yaml (or --multi_gpu) instead")


WRAPPED = "_checkpoint_wrapped_module."  # torch's activation-checkpoint wrapper (fsdp_activation_checkpointing)


def plain_name(name: str) -> str:
    """A parameter's name as the unwrapped model has it: the activation-checkpoint wrapper FSDP puts around
    blocks adds a level that named_parameters() shows (state_dict() hides it), and checkpoints must not."""
    return name.replace(WRAPPED, "")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of `tensor` this process holds: all of it unless it is sharded."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def like(reference: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    """`part` (this process's piece, as read from a checkpoint) sharded as `reference` is."""
    if not isinstance(reference, DTensor):
        return part
    return DTensor.from_local(part.to(reference.device), reference.device_mesh, reference.placements,
                              shape=reference.shape, stride=reference.stride())


def shard_optimizer_state(state_dict: dict, params: list[torch.Tensor], checkpoint: Path) -> dict:
    """An optimizer state dict read from local parts, with the slots the checkpoint's layout says were split
    sharded like their parameter again (load_state_dict would otherwise keep plain tensors beside DTensors)."""
    split = set(json.loads((checkpoint / LAYOUT).read_text())["sharded"]["optimizer"])
    for index, slots in state_dict["state"].items():
        for key, value in slots.items():
            if f"{index}.{key}" in split:
                slots[key] = like(params[index], value)
    return state_dict


def state_bytes(parameters: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of trained weights and optimizer state this process holds."""
    held = sum(local(p).nbytes for p in parameters)
    for slots in optimizer.state.values():
        held += sum(local(v).nbytes for v in slots.values() if torch.is_tensor(v))
    return held


def plain_copy(module: torch.nn.Module, keep: bool, device: torch.device) -> torch.nn.Module | None:
    """An unsharded copy of an FSDP module, for rank 0 to sample from and save.

    Every process must call it (the weights are gathered from all of them); those with
    `keep` False get None. The copy is built empty (see `rebuilt`), given the gathered weights and
    moved to `device`.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload: gathered layer by layer into rank 0's CPU memory; the other ranks keep nothing of it.
    whole = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not keep:
        return None
    return copy_holding(module, whole, device)


def copy_holding(module: torch.nn.Module, weights: dict[str, torch.Tensor], device: torch.device) -> torch.nn.Module:
    """A plain module of `module`'s kind (see `rebuilt`) holding `weights`, on `device`: rank 0's copy of a module
    whose weights are split (FSDP, ZeRO-3), to sample from and save."""
    copy = rebuilt(module)
    copy.load_state_dict(weights)
    return copy.to(device)


def rebuilt(module: torch.nn.Module) -> torch.nn.Module:
    """A new module of `module`'s kind: diffusers and transformers models from their own config; a plain
    wrapper (as the VAE method's Autoencode) by calling its class with its children, rebuilt, in order."""
    from torch.distributed.fsdp import FSDPModule

    # fully_shard gives a module a subclass of its own class and FSDPModule; the model class is the other base.
    base = next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))
    config = getattr(module, "config", None)
    if config is not None:
        return base.from_config(config) if hasattr(base, "from_config") else base(config)
    children = list(module.children())
    try:
        return base(*(rebuilt(child) for child in children))
    except TypeError as exc:
        raise ShardingError(f"cannot rebuild an unsharded {base.__name__} to sample from and save ({exc}): with split "
                            "weights (FSDP, ZeRO-3) difftrain trains diffusers and transformers models, and wrappers "
                            "built from them alone") from None


def write_layout(folder: Path, parts: dict[str, dict[str, torch.Tensor]], world_size: int) -> None:
    """Record, per part, which tensors are split on their first dimension (the rest are whole on every rank)."""
    layout = {"world_size": world_size, "dim": 0,
              "sharded": {part: sorted(k for k, v in tensors.items() if isinstance(v, DTensor))
                          for part, tensors in parts.items()}}
    write_text(folder / LAYOUT, json.dumps(layout, indent=1), sync=False)


def part_file(part: str, rank: int) -> str:
    return f"{part}-rank{rank}.safetensors"


def consolidate(checkpoint: Path, out: Path | None = None) -> list[Path]:
    """Join a sharded checkpoint's parts into model/ema/optimizer.safetensors (in `out`, default the
    checkpoint itself): the layout an unsharded run writes, which `difftrain sample` and export read."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / "state.json").is_file():
        raise ShardingError(f"{checkpoint}: not a checkpoint folder (no state.json inside)")
    if not (checkpoint / LAYOUT).is_file():
        state = checkpoint / "state.json"
        stage = json.loads(state.read_text()).get("zero_stage", 0) if state.is_file() else 0
        if stage:
            raise ShardingError(f"{checkpoint}: a DeepSpeed ZeRO-{stage} checkpoint's model and EMA are whole already "
                                "(`difftrain sample` reads them); its optimizer partitions resume with the same "
                                "number of processes")
        raise ShardingError(f"{checkpoint} is not a sharded checkpoint (no {LAYOUT}); its files are already whole")
    layout = json.loads((checkpoint / LAYOUT).read_text())
    out = Path(out) if out is not None else checkpoint
    out.mkdir(parents=True, exist_ok=True)
    written = []
    # model last: a checkpoint with model.safetensors is taken as joined, so one stopped half-way is not
    # (`difftrain sample` then says to consolidate, instead of drawing from the raw weights without the EMA)
    for part in sorted(layout["sharded"], key=lambda name: name == "model"):
        sharded = layout["sharded"][part]
        files = [checkpoint / part_file(part, rank) for rank in range(layout["world_size"])]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ShardingError(f"{checkpoint} lacks {', '.join(missing)}: was every process's part written "
                                "to this folder? (the run folder must be shared by all machines)")
        pieces = [load_file(str(f)) for f in files]
        split = set(sharded)
        whole = {key: torch.cat([p[key] for p in pieces], dim=layout["dim"]) if key in split else value
                 for key, value in pieces[0].items()}
        written.append(write_safetensors(out / f"{part}.safetensors", whole))
    if out != checkpoint:  # what `difftrain sample` reads beside the weights
        for name in ("difftrain.json", "config.yaml"):
            if (checkpoint / name).is_file():
                shutil.copy2(checkpoint / name, out / name)
    return written
