"""A tiny Stable Diffusion, built offline with random weights, for tests and experiments.

It has every part a real one has (CLIP tokenizer and text encoder, AutoencoderKL, a
cross-attention UNet2DConditionModel, a scheduler) in the same diffusers folder layout,
so everything that loads, trains or exports Stable Diffusion can be exercised on it in
seconds and without the network. The tokenizer is a genuine byte-level BPE CLIP tokenizer
with a small vocabulary: any text tokenizes (unknown words fall back to single bytes).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from difftrain.atomic import atomic_dir

# Whole-word tokens: the words our tests, the shapes set and common tutorial prompts use.
# Anything else still tokenizes, byte by byte.
WORDS = (
    "a an the of in on with and photo picture painting style art drawing sks dog cat person face "
    "red green blue yellow white black orange purple circle square triangle shape small big "
    "background plain light dark house hill sun sky high quality blurry low"
).split()

SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def _apply_bpe(parts: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the lowest-ranked adjacent pair until none applies."""
    while len(parts) > 1:
        pairs = [(ranks.get(pair, len(ranks)), i) for i, pair in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2 :]
    return parts


def build_clip_tokenizer(words: tuple[str, ...] | list[str] = WORDS, model_max_length: int = 77):
    """A CLIP BPE tokenizer in which each of `words` is exactly one token.

    Each word is first split by the merges made so far, then its pieces are chained together;
    merges are ranked in the order made, so a later word can never split an earlier one.
    """
    from transformers import CLIPTokenizer

    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in symbols + [s + "</w>" for s in symbols]:
        vocab.setdefault(token, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(words):
        parts = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        merged = parts[0]
        for part in parts[1:]:
            ranks[(merged, part)] = len(ranks)
            merged += part
            vocab.setdefault(merged, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=model_max_length)


def tiny_sd_components(
    seed: int = 0,
    unet_channels: tuple[int, ...] = (32, 64),
    vae_channels: tuple[int, ...] = (32, 64),
    text_hidden: int = 32,
    text_layers: int = 2,
    latent_channels: int = 4,
    sample_size: int = 32,
    model_max_length: int = 77,
    layers_per_block: int = 1,
) -> dict:
    """Random-weight components, deterministic by `seed`. `sample_size` is the image side in pixels."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer(model_max_length=model_max_length)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_hidden,
            intermediate_size=text_hidden * 2,
            num_hidden_layers=text_layers,
            num_attention_heads=max(1, text_hidden // 16),
            max_position_embeddings=model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            projection_dim=text_hidden,
        )
    )
    levels = len(vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=vae_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=math.gcd(32, *vae_channels),
        sample_size=sample_size,
    )
    latent_size = sample_size // 2 ** (levels - 1)
    unet_levels = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=unet_channels,
        layers_per_block=layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * (unet_levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (unet_levels - 1),
        cross_attention_dim=text_hidden,
        attention_head_dim=max(1, unet_channels[0] // 8),
        norm_num_groups=math.gcd(32, *unet_channels),
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SD_SCHEDULER),
    }


def write_tiny_sd(out_dir: str | Path, seed: int = 0, **sizes) -> Path:
    """Save a tiny random Stable Diffusion pipeline in diffusers format; returns the folder."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        **tiny_sd_components(seed, **sizes), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    with atomic_dir(out_dir) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return Path(out_dir)


def write_tiny_controlnet(base_dir: str | Path, out_dir: str | Path, seed: int = 0, zero_conv_std: float = 0.05,
                          cross_attention_dim: int | None = None) -> Path:
    """A ControlNet for the SD model in `base_dir`, made from its UNet as training starts one
    (`ControlNetModel.from_unet`), with its zero convolutions drawn random so that it steers
    from the start; `cross_attention_dim` gives it another text width (a misfit, for tests)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from difftrain.models.control import controlnet_from_unet

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    if cross_attention_dim:
        unet = UNet2DConditionModel.from_config({**unet.config, "cross_attention_dim": cross_attention_dim})
    levels = len(AutoencoderKL.load_config(Path(base_dir) / "vae")["block_out_channels"])
    net = controlnet_from_unet(unet, levels)
    for module in (*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out):
        torch.nn.init.normal_(module.weight, std=zero_conv_std)
    net.save_pretrained(out_dir)
    return Path(out_dir)
