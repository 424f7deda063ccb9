"""CLIP score (Hessel et al. 2021): how well an image matches its prompt, with any CLIP transformers loads.

The mean over images of 100 x cos(image embedding, text embedding), clamped at 0, as
torchmetrics' CLIPScore computes it; the x100 scale is its convention (the paper's w = 2.5
aside), so the numbers read like published "CLIP score" tables. The model comes from a local
folder or a hub id (transformers' own cache, offline-first like every other weight here);
prompts longer than its context are truncated, as torchmetrics does.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image

from difftrain.evaluate.weights import EvalError, hub_models_offline

DEFAULT_CLIP = "openai/clip-vit-large-patch14"  # torchmetrics' default and the usual one in papers


def check_available(model: str | Path, what: str = "CLIP model") -> None:
    """Refuse a model that cannot be had offline, without loading it (training checks this before its first step)."""
    if Path(model).is_dir() or not hub_models_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(str(model), "config.json")
    except ValueError:  # (huggingface_hub's HFValidationError: a path that does not exist is no hub id either)
        raise EvalError(f"{what} {model}: no such folder, and not a Hugging Face Hub id (owner/name)") from None
    if not isinstance(cached, str):
        raise EvalError(f"{what} {model}: not in the Hugging Face cache, and this machine is offline (or cannot reach "
                        "the Hub): download it "
                        f"once elsewhere (huggingface-cli download {model}), or give a local folder")


class ClipScorer:
    def __init__(self, model: str | Path = DEFAULT_CLIP, device: str | torch.device = "cpu",
                 batch_size: int | None = None):
        from transformers import CLIPModel, CLIPProcessor

        cached_only = not Path(model).is_dir() and hub_models_offline()  # (a folder needs no Hub)
        try:
            self.model = CLIPModel.from_pretrained(str(model), local_files_only=cached_only).to(device).eval()
            self.processor = CLIPProcessor.from_pretrained(str(model), local_files_only=cached_only)
        except (OSError, ValueError) as error:
            hint = (" This machine is offline: download it once elsewhere (huggingface-cli download "
                    f"{model}) into the Hugging Face cache, or give a local folder with --clip-model."
                    if cached_only else "")
            raise EvalError(f"CLIP model {model}: cannot load it ({str(error).splitlines()[0]}).{hint}") from None
        self.device, self.batch_size = torch.device(device), batch_size or 32
        self.info = {"model": str(model), "scale": "max(mean of 100 x cos, 0), as torchmetrics' CLIPScore"}

    @torch.no_grad()
    def image_embeddings(self, images: Iterable[Image.Image]) -> torch.Tensor:
        """(N, D) float32 unit-length image embeddings; `images` is read a batch at a time."""
        out, images = [], iter(images)
        while batch := [im.convert("RGB") for im in itertools.islice(images, self.batch_size)]:
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_unit(self.model.get_image_features(pixel_values=pixels)))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """(N, D) float32 unit-length text embeddings; prompts past the context are truncated."""
        out = []
        for start in range(0, len(prompts), self.batch_size):
            tokens = self.processor(text=prompts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                    truncation=True).to(self.device)
            out.append(_unit(self.model.get_text_features(input_ids=tokens["input_ids"],
                                                          attention_mask=tokens["attention_mask"])))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.projection_dim)

    def scores(self, images: Iterable[Image.Image], prompts: list[str]) -> torch.Tensor:
        """100 x the cosine of each (image, prompt) pair."""
        embedded = self.image_embeddings(images)
        if len(embedded) != len(prompts):
            raise ValueError("one prompt per image")
        return 100 * (embedded * self.text_embeddings(prompts)).sum(dim=-1)

    def score(self, images: Iterable[Image.Image], prompts: list[str]) -> float:
        """The CLIP score of a set: the mean of `scores`, then clamped at 0, as torchmetrics computes it (clamping
        each pair first read higher wherever some cosines are negative, as early in training)."""
        return max(float(self.scores(images, prompts).mean()), 0.0)


def _unit(features) -> torch.Tensor:
    features = getattr(features, "pooler_output", features)  # some transformers versions return an output object
    return torch.nn.functional.normalize(features.float(), dim=-1).cpu()
