"""What a training method is, as far as the loop is concerned.

The loop owns optimisation, precision, accumulation, EMA, checkpoints and logging. A
method owns the rest: the data it reads and how a batch is collated, which modules exist
and which of them train (and which the speed options apply to), what its cache holds, how
a batch becomes a loss, how to draw preview images, and what to write as the final model
with the manifest that says how to load it. Adding a method is adding one module that
implements this class and its config section; the loop, data/ and generate/ never change.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import torch
from PIL import Image

from difftrain.config import RunConfig
from difftrain.data.dataset import collate
from difftrain.models.manifest import Manifest


class Method(ABC):
    name: str

    def __init__(self, config: RunConfig):
        self.config = config

    @abstractmethod
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        """Modules with parameters to optimise, by name. Names key their checkpoint weights."""

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        """Optimizer parameter groups; override to give a module its own learning rate."""
        params = [p for m in self.trainable_modules().values() for p in m.parameters() if p.requires_grad]
        return [{"params": params, "lr": learning_rate}]

    def speed_modules(self) -> dict[str, torch.nn.Module]:
        """Modules gradient checkpointing and the attention kernel apply to: those gradients flow through."""
        return self.trainable_modules()

    def prepare_data(self, accelerator, compute_dtype: torch.dtype, progress: bool) -> None:
        """Runs before the data set is opened: make data that must exist first (DreamBooth's class images),
        under the run's autocast dtype `compute_dtype`."""

    def build_dataset(self, progress: bool):
        """The data this method trains on: by default the images of `data:`, one record per item."""
        from difftrain.training.run_data import open_images

        return open_images(self.config, progress=progress)

    # How items become a batch; a plain function, so DataLoader workers can pickle it.
    collate = staticmethod(collate)

    def check_resume(self, checkpoint: Path) -> None:
        """Refuse a checkpoint this method cannot continue, before anything loads (the data may have
        changed under --allow-data-change)."""

    def setup(self, accelerator, weight_dtype: torch.dtype, dataset, progress: bool) -> None:
        """Called once the device and data are known: move frozen parts, fill caches, pick previews."""

    @abstractmethod
    def loss(self, modules: dict[str, torch.nn.Module], batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The scalar loss of one micro-batch; `modules` are the (possibly DDP-wrapped) trainables.

        All randomness must come from `generator`, which checkpoints save and restore.
        """

    @abstractmethod
    def sample(
        self, modules: dict[str, torch.nn.Module], num_images: int, scheduler: str, steps: int, seed: int
    ) -> list[Image.Image]:
        """Preview images from the given (unwrapped, eval-mode) modules, at a fixed seed."""

    def draws_samples(self) -> bool:
        """Whether `sample` has anything to draw: if not, the trainer skips the previews' weight swap or gather."""
        return True

    def sample_scores(self, images: list[Image.Image]) -> dict[str, float]:
        """Numbers about the preview images, logged beside them (ControlNet: agreement with the condition)."""
        return {}

    def preview_columns(self, count: int) -> int | None:
        """How many columns the preview grid of `count` images has; None: square-ish."""
        return None

    def model_configs(self) -> dict[str, dict]:
        """The config of each model this method trains (a diffusers model's), as JSON: the trainer keeps it in every
        checkpoint and refuses a resume whose model was built otherwise (an edited model.unet_config or model.vae
        .json), which the config file, holding the .json's path alone, does not show."""
        return {name: model_config(module) for name, module in self.trainable_modules().items()
                if isinstance(getattr(module, "config", None), dict)}

    takes_prompts = False  # whether evaluation_images draws from prompts

    def evaluation_images(
        self, modules: dict[str, torch.nn.Module], prompts: list[str] | None, seed: int, scheduler: str, steps: int,
        guidance_scale: float, batch_size: int,
    ) -> list[Image.Image]:
        """Images to measure during training (eval.every_steps), from the unwrapped eval-mode modules.

        Image i uses seed + i (and prompts[i] when `takes_prompts`); all randomness comes
        from generators seeded here, never the global one, so evaluating changes no weight.
        """
        raise NotImplementedError(f"method {self.name} draws nothing to evaluate")

    @abstractmethod
    def save_model(self, modules: dict[str, torch.nn.Module], out_dir: Path) -> None:
        """Write the final model in the ecosystem's format (a diffusers folder, LoRA file, ...)."""

    @abstractmethod
    def manifest(self) -> Manifest:
        """What `save_model` writes, as `models.manifest` describes it: kind, base, adapters, noise, conditioning."""

    def describe(self) -> list[str]:
        """Lines for the run summary: model size and the like."""
        # Under DeepSpeed ZeRO-3 a parameter is an empty placeholder; ds_numel is its size.
        def size(m: torch.nn.Module, trained: bool) -> int:
            return sum(getattr(p, "ds_numel", p.numel()) for p in m.parameters() if p.requires_grad == trained)

        lines = []
        for name, module in self.trainable_modules().items():
            frozen = size(module, False)  # a LoRA's base, the text encoder around a new token's vectors
            lines.append(f"{name}: {_millions(size(module, True))} trainable parameters"
                         + (f" (beside {_millions(frozen)} frozen)" if frozen else ""))
        return lines


def model_config(module: torch.nn.Module) -> dict:
    """A diffusers model's config as JSON values, without diffusers' own bookkeeping (keys from "_")."""
    import json

    return json.loads(json.dumps({k: v for k, v in module.config.items() if not k.startswith("_")}, default=str))


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 10_000 else f"{count:,}"
