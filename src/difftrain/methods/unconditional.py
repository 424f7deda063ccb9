"""Pixel-space diffusion: a UNet2DModel learns to denoise the images themselves.

With `model.classes` it is class-conditional: each image's caption names its class, a share
of labels (`model.class_dropout`) is trained as the extra "no class" label, and sampling
guides from that towards the asked class (classifier-free guidance). On the shapes demo this
reached the unconditional recipe's share of clean images in ~1,500 steps instead of 2,100,
every clean image of the class asked for (README, the end of "Samplers").
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from diffusers import DDPMPipeline
from PIL import Image

from difftrain.data.dataset import collate
from difftrain.errors import ConfigError
from difftrain.methods.base import Method
from difftrain.models.manifest import Manifest
from difftrain.models.noise import trained_settings
from difftrain.models.unet import build_unet
from difftrain.sampling.loop import class_draw, sample_unet, sample_unet_batched
from difftrain.training.losses import build_noise_scheduler, denoising_loss

log = logging.getLogger(__name__)


class Unconditional(Method):
    name = "unconditional"

    def __init__(self, config):
        super().__init__(config)
        self.classes: list[str] | None = None  # class names, known once the data is open
        self._class_index: dict[str, int] = {}  # name -> label, for the loss
        self.unet = None if config.model.classes else self._build_unet()
        self.noise_scheduler = build_noise_scheduler(config.noise)
        self._unknown_captions: set[str] = set()

    def _build_unet(self, num_class_embeds: int | None = None):
        model = self.config.model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)  # the same initial weights whether or not the data was opened first
            return build_unet(model.preset, model.unet_config, model.channels, self.config.data.resolution,
                              num_class_embeds)

    def build_dataset(self, progress: bool):
        dataset = super().build_dataset(progress)
        if self.config.model.classes:
            self.classes = resolve_classes(self.config.model.classes, dataset.source.stored_files())
            self._class_index = {name: label for label, name in enumerate(self.classes)}
            self.unet = self._build_unet(len(self.classes) + 1)  # the last embedding is "no class"
            # Labels come with the batch and reach the device beside the pixels, not as a blocking
            # copy of a host tensor in the step (a wait for a GPU every step).
            self.collate = partial(labelled_collate, class_index=self._class_index, no_class=len(self.classes))
        return dataset

    def check_resume(self, checkpoint: Path) -> None:
        from difftrain.models.manifest import read_manifest
        from difftrain.training.checkpoint import CheckpointError

        manifest = read_manifest(checkpoint)
        saved = manifest.conditioning.get("classes") if manifest else None
        if manifest is not None and saved != self.classes:
            raise CheckpointError(
                f"cannot resume from {checkpoint}: it was trained on the classes {_listed(saved)}, this data gives "
                f"{_listed(self.classes)}; a label means its class only in the list it was trained with. Restore the "
                "data (or model.classes), or start a new output_dir.")

    def describe(self) -> list[str]:
        if self.classes is None:
            return super().describe()
        return super().describe() + [f"classes {_listed(self.classes)}, "
                                     f"sampled with guidance {self.config.model.class_guidance}"]

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet}

    def loss(self, modules, batch, generator):
        unet = modules["unet"]
        if self.classes is None:
            return denoising_loss(batch["pixel_values"], lambda x, t: unet(x, t).sample, self.noise_scheduler,
                                  self.config.noise, generator)
        self._warn_unknown(batch["caption"])
        labels = batch.get("class_labels")
        if labels is None:  # a batch from the plain collate
            labels = class_labels(batch["caption"], self._class_index, len(self.classes))
        labels = labels.to(generator.device)
        drop = self.config.model.class_dropout
        dropped = torch.rand(labels.shape, generator=generator, device=generator.device) < drop
        labels = torch.where(dropped, len(self.classes), labels).to(batch["pixel_values"].device)
        return denoising_loss(batch["pixel_values"], lambda x, t: unet(x, t, class_labels=labels).sample,
                              self.noise_scheduler, self.config.noise, generator)

    def _warn_unknown(self, captions: list[str]) -> None:
        """Once per caption: an uncaptioned image, or one whose caption is no class (possible only
        where captions live inside shards, unchecked at start), trains as "no class"."""
        for caption in captions:
            if caption not in self._class_index and caption not in self._unknown_captions:
                self._unknown_captions.add(caption)
                what = f"caption {caption!r} is not one of model.classes" if caption else "an image has no caption"
                log.warning("%s: its images train as 'no class'", what)

    def _draw(self, count: int) -> dict:
        """The labels and guidance of `count` images: every class in turn (none for an unconditional model).
        Evaluation guides at model.class_guidance too, not eval.guidance_scale (text2image's, 7.5 by default)."""
        return {} if self.classes is None else class_draw(self.classes, count, self.config.model.class_guidance)

    def sample(self, modules, num_images, scheduler, steps, seed) -> list[Image.Image]:
        unet = modules["unet"]
        return sample_unet(unet, self.noise_scheduler.config, num_images, scheduler, steps, seed,
                           **self._draw(num_images))

    def evaluation_images(self, modules, prompts, seed, scheduler, steps, guidance_scale, batch_size) -> list[Image.Image]:
        unet = modules["unet"]
        return sample_unet_batched(unet, self.noise_scheduler.config, len(prompts), scheduler, steps, seed,
                                   batch_size, **self._draw(len(prompts)))

    def save_model(self, modules, out_dir: Path) -> None:
        DDPMPipeline(unet=modules["unet"], scheduler=self.noise_scheduler).save_pretrained(out_dir)

    def manifest(self) -> Manifest:
        conditioning = {"resolution": self.config.data.resolution}
        if self.classes is not None:
            conditioning.update(classes=self.classes, guidance_scale=self.config.model.class_guidance)
        return Manifest(
            "unconditional", self.name, scheduler="scheduler",
            noise=trained_settings(self.noise_scheduler.config),
            conditioning=conditioning,
            architecture={"unet": dict(self.unet.config), "scheduler": dict(self.noise_scheduler.config)},
            trained={"steps": self.config.training.max_steps},
        )


def class_labels(captions: list[str], class_index: dict[str, int], no_class: int) -> torch.Tensor:
    """Each caption's class label; a caption that names no class gets `no_class`."""
    return torch.tensor([class_index.get(caption.strip(), no_class) for caption in captions])


def labelled_collate(items: list[dict], class_index: dict[str, int], no_class: int) -> dict:
    """`collate`, plus "class_labels" from the captions. Module-level (bound with functools.partial),
    so DataLoader workers can pickle it."""
    batch = collate(items)
    batch["class_labels"] = class_labels(batch["caption"], class_index, no_class)
    return batch


def resolve_classes(setting: str | list[str], files: list[tuple[str, str, list[str]]]) -> list[str]:
    """The class names `model.classes` means, checked against the captions the data keeps beside its images.

    `files` is the source's (key, path, captions) list. 'captions' takes every distinct caption,
    sorted; a list (its names stripped by the config) must hold every caption the data has.
    """
    # Stripped, as the config strips the list's names: a metadata.jsonl "a red circle " names "a red circle".
    captions = {caption.strip(): path for _, path, texts in files for caption in texts if caption.strip()}
    if setting == "captions":
        if not captions:
            raise ConfigError("model.classes: captions: this data has no captions beside its images (shards and "
                              "Hugging Face tables keep them inside, unread at start); list the class names in "
                              "model.classes instead")
        return sorted(captions)
    missing = [caption for caption in captions if caption not in setting]
    if missing:
        examples = "; ".join(f"{caption!r} ({captions[caption]})" for caption in missing[:3])
        raise ConfigError(f"model.classes: {len(missing)} caption(s) of the data are no class in the list, e.g. "
                          f"{examples}: add them to model.classes, or set model.classes: captions")
    return setting


def _listed(classes: list[str] | None) -> str:
    if not classes:
        return "(none: unconditional)"
    return f"{len(classes)} ({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''})"
