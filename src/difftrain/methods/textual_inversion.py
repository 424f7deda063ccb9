"""Textual Inversion: learn the embedding of a new word, and nothing else.

The new token(s) are added to the tokenizer and their vectors live in a small parameter
beside the text encoder's frozen embedding table (`NewTokenEmbedding`), so no other row
can move, not by a stray gradient and not by weight decay: every other row stays
bit-identical by construction (tested). Captions come from object or style templates
("a photo of a {}"), picked per sample from the seeded generator.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from difftrain.config import ConfigError
from difftrain.methods.text2image import TextToImage, tokenize
from difftrain.models.embeddings import EmbeddingFileError, check_token

log = logging.getLogger(__name__)

# The prompt templates of the Textual Inversion paper's code (as in diffusers' example).
OBJECT_TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
    "a close-up painting in the style of {}", "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}", "a large painting in the style of {}",
)


class NewTokenEmbedding(torch.nn.Module):
    """The frozen token table for old ids, a trainable `vectors` row per new id."""

    def __init__(self, table: torch.nn.Embedding, vectors: torch.Tensor):
        super().__init__()
        self.table = table
        self.first_new = table.num_embeddings
        self.vectors = torch.nn.Parameter(vectors.clone().float())

    @property
    def weight(self) -> torch.Tensor:  # what transformers' get_input_embeddings() callers read
        return torch.cat([self.table.weight, self.vectors.to(self.table.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.first_new
        old = self.table(ids.clamp(max=self.first_new - 1))
        new = self.vectors.to(old.dtype)[(ids - self.first_new).clamp(min=0)]
        return torch.where(is_new[..., None], new, old)


class TextualInversion(TextToImage):
    name = "textual_inversion"
    captions_from_data = False  # each caption is a template, drawn in the step (batch_parts)

    def __init__(self, config):
        super().__init__(config)
        settings = config.textual_inversion
        self.placeholders = [settings.token] + [f"{settings.token}_{i}" for i in range(1, settings.num_vectors)]
        try:
            file_name = check_token(settings.token)
        except EmbeddingFileError as reason:
            raise ConfigError(f"textual_inversion.token: {reason}") from None
        stem = Path(file_name).stem
        if len(self.tokenizer.encode(stem, add_special_tokens=False)) == 1:
            # A1111 finds an embedding by its file name anywhere in a prompt.
            log.warning("textual_inversion.token %r is saved for AUTOMATIC1111 as %s, and %r is a word of the "
                        "tokenizer: in A1111 every prompt with that word would use the embedding; a token such as "
                        "'<%s-emb>' avoids it", settings.token, file_name, stem, stem)
        vocab = self.tokenizer.get_vocab()
        # A word the tokenizer already spells as one token would keep its old meaning in prompts.
        clashes = [t for t in self.placeholders
                   if t in vocab or len(self.tokenizer.encode(t, add_special_tokens=False)) == 1]
        if clashes:
            raise ConfigError(f"textual_inversion.token = {settings.token!r}: {clashes[0]!r} is already a word "
                              "of this tokenizer; choose a new string such as '<my-thing>'")
        init_ids = self.tokenizer.encode(settings.initializer, add_special_tokens=False)
        if len(init_ids) != 1:
            raise ConfigError(f"textual_inversion.initializer = {settings.initializer!r} is {len(init_ids)} tokens "
                              "for this tokenizer; it must be exactly one (try a common single word)")
        self.tokenizer.add_tokens(self.placeholders)
        self.templates = OBJECT_TEMPLATES if settings.learnable_property == "object" else STYLE_TEMPLATES
        words = " ".join(self.placeholders)
        longest = max(len(self.tokenizer.encode(template.format(words))) for template in self.templates)
        if longest > self.max_length:  # the vectors cut off the captions' end would be saved untrained
            raise ConfigError(f"text2image.max_length = {self.max_length}: the longest caption template with "
                              f"textual_inversion.num_vectors = {settings.num_vectors} is {longest} tokens; raise "
                              "max_length or lower num_vectors")
        embeddings = self.text_encoder.get_input_embeddings()
        start = embeddings.weight[init_ids[0]].detach()
        self.unet.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.new_tokens = NewTokenEmbedding(embeddings, start.expand(settings.num_vectors, -1))
        self.text_encoder.set_input_embeddings(self.new_tokens)

    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder}

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        return [{"params": [self.new_tokens.vectors], "lr": learning_rate}]

    def expand_prompt(self, prompt: str) -> str:
        """`<token>` in a prompt stands for all its vectors, as diffusers' load_textual_inversion does it."""
        return prompt.replace(self.placeholders[0], " ".join(self.placeholders))

    def setup(self, accelerator, weight_dtype, dataset, progress) -> None:
        super().setup(accelerator, weight_dtype, dataset, progress)
        # Every caption this run trains on, tokenised once: a step picks rows on the device, where
        # writing the picked templates out would wait for the GPU (.tolist()) every step.
        words = " ".join(self.placeholders)
        self.template_ids = tokenize(self.tokenizer, [template.format(words) for template in self.templates],
                                     self.max_length).to(accelerator.device)

    def batch_parts(self, batch: dict, generator: torch.Generator) -> dict:
        picks = torch.randint(0, len(self.templates), (len(batch["caption"]),), generator=generator,
                              device=generator.device)
        return {**batch, "input_ids": self.template_ids[picks.to(self.template_ids.device)]}

    def save_model(self, modules, out_dir: Path) -> None:
        from difftrain.models.embeddings import save_embedding

        save_embedding(out_dir, self.placeholders[0], self.new_tokens.vectors.detach().float().cpu(),
                       metadata=self.training_facts())
        self.saved_scheduler().save_pretrained(out_dir / "scheduler")

    def describe_adapter(self, manifest) -> None:
        manifest.kind = "embedding"
        manifest.embeddings = [{"file": "learned_embeds.safetensors", "token": self.placeholders[0]}]

    def speed_modules(self) -> dict[str, torch.nn.Module]:
        return {"unet": self.unet, "text_encoder": self.text_encoder}  # gradients flow through the frozen UNet
