"""Pixel-space UNets: named presets, or any diffusers UNet2DModel config JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from difftrain.errors import ConfigError

if TYPE_CHECKING:
    from diffusers import UNet2DModel

# Sizes chosen by measurement on 2 CPU cores (see README): "tiny" is for tests (a step in
# milliseconds); "mini" is the demo's: at 32 px it learns the shapes set in fewer minutes than
# "small", at two thirds of its width and under half its parameters (x1.5 the steps/s, and more
# clean shapes per step: README, "a narrower UNet, and the demo within 3 minutes"); "small", the
# default, was the demo's before; "base" is the DDPM CIFAR-10 shape for a GPU.
_SMALL = dict(
    block_out_channels=(24, 48, 96),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    norm_num_groups=8,
    attention_head_dim=24,
)
UNET_PRESETS: dict[str, dict] = {
    "tiny": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ),
    "mini": dict(_SMALL, block_out_channels=(16, 32, 64), attention_head_dim=32),  # small, narrower
    "small": _SMALL,
    "base": dict(
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=32,
        dropout=0.1,
    ),
}


def unet_config(preset: str | None, config_file: str | None, channels: int, resolution: int) -> dict:
    """The UNet2DModel config of a preset (default "small") or a config file, at this size and channel count."""
    if config_file:
        path = Path(config_file)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
            raise ConfigError(f"model.unet_config: cannot read {path} as JSON: {exc}") from None
        if not isinstance(config, dict):
            raise ConfigError(f"model.unet_config: {path} holds a JSON {type(config).__name__}, not the object of a "
                              "UNet2DModel config (its config.json)")
        config = {k: v for k, v in config.items() if not k.startswith("_")}
    else:
        config = dict(UNET_PRESETS[preset or "small"])
    config.update(sample_size=resolution, in_channels=channels, out_channels=channels)
    return config


def build_unet(preset: str | None, config_file: str | None, channels: int, resolution: int,
               num_class_embeds: int | None = None) -> UNet2DModel:
    from diffusers import UNet2DModel  # here, not at import: the config module reads the presets' names

    config = unet_config(preset, config_file, channels, resolution)
    if num_class_embeds:
        config["num_class_embeds"] = num_class_embeds
    elif config.get("num_class_embeds") or config.get("class_embed_type"):  # it wanted labels at the first step
        raise ConfigError(f"model.unet_config: {config_file} is a class-conditional UNet's (num_class_embeds, "
                          "class_embed_type); set model.classes to train one, or remove those keys")
    factor = 2 ** (len(config["down_block_types"]) - 1 if "down_block_types" in config else 3)  # (diffusers': 4)
    if resolution % factor:  # a size the downsampling cannot take back up failed at the first step, deep in torch
        raise ConfigError(f"data.resolution = {resolution}: the UNet ({config_file or preset}) halves an image "
                          f"{factor.bit_length() - 1} times (x1/{factor}); give a multiple of {factor}")
    try:
        return UNet2DModel(**config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: cannot build a UNet2DModel from {config_file or preset}: {exc}") from None
