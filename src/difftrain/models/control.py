"""Networks that steer a frozen UNet with a conditioning image: ControlNet and T2I-Adapter.

Made from a UNet for training, loaded from anywhere for inference, checked against the UNet
they steer, and wrapped with their base into diffusers' pipelines.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from difftrain.errors import DifftrainError

# diffusers' (and the original's) hint encoder widths; the list is cut to the VAE's depth below.
HINT_CHANNELS = (16, 32, 96, 256)


class ControlNetError(DifftrainError):
    pass


def controlnet_from_unet(unet, vae_levels: int, conditioning_channels: int = 3):
    """A ControlNet initialised from `unet` (its encoder's weights, zero convolutions at zero).

    The condition enters at pixel size and must reach the latent size: its encoder halves the
    size once per VAE level beyond the first (SD's 4 levels: 16, 32, 96, 256, as released).
    """
    from diffusers import ControlNetModel

    if vae_levels > len(HINT_CHANNELS):
        raise ControlNetError(f"a VAE with {vae_levels} levels: the ControlNet's hint encoder has at most "
                              f"{len(HINT_CHANNELS)}")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS[:vae_levels],
                                     conditioning_channels=conditioning_channels)


def adapter_for_unet(unet, vae_levels: int, adapter_type: str = "full_adapter", num_res_blocks: int = 2):
    """A new T2I-Adapter for `unet`: one feature map per UNet level, at that level's width and size
    (the first at the latent size: the condition is pixel-unshuffled by the VAE's factor)."""
    from diffusers import T2IAdapter

    widths = list(unet.config.block_out_channels)
    if adapter_type == "light_adapter":
        # A light adapter repeats its last width for one more level (SD's 320, 640, 1280 -> 4 maps).
        if len(widths) < 2 or widths[-1] != widths[-2]:
            raise ControlNetError(f"t2i_adapter.adapter_type light_adapter repeats its last width, so it needs a UNet "
                                  f"whose last two widths are equal (SD's 1280, 1280); this one has {tuple(widths)}: "
                                  "use full_adapter")
        widths = widths[:-1]
    return T2IAdapter(in_channels=3, channels=widths, num_res_blocks=num_res_blocks,
                      downscale_factor=2 ** (vae_levels - 1), adapter_type=adapter_type)


def with_weight_applied(controlnet, weight: float):
    """A copy of `controlnet` that gives at weight 1 what it gives at `weight`: its zero convolutions (the
    1x1 convolutions every residual leaves through, the only place the weight acts) scaled. Exact, so a
    ControlNet trained at another weight loads in diffusers, A1111 and ComfyUI at their default of 1."""
    import copy

    baked = copy.deepcopy(controlnet)
    with torch.no_grad():
        for conv in [*baked.controlnet_down_blocks, baked.controlnet_mid_block]:
            conv.weight.mul_(weight)
            conv.bias.mul_(weight)
    return baked


def feature_widths(adapter) -> list[int]:
    """The width of each feature map a T2I-Adapter gives, in the UNet's level order."""
    channels = list(adapter.config.channels)
    return channels + channels[-1:] if adapter.config.adapter_type == "light_adapter" else channels


def is_adapter(net) -> bool:
    return type(net).__name__ in ("T2IAdapter", "MultiAdapter")


KINDS = {"controlnet": "ControlNet", "t2i-adapter": "T2I-Adapter"}


def load_control(spec: str, dtype: torch.dtype, unet, what: str = "--controlnet", kind: str | None = None,
                 latent_scale: int | None = None):
    """A ControlNetModel or T2IAdapter from a folder, a run folder's model, a hub id or (ControlNet) a
    single file, checked against `unet` (and, given, the VAE's `latent_scale`, pixels per latent). `what`
    names the setting it came from, for messages; `kind` (controlnet or t2i-adapter), if given, is the
    only kind accepted."""
    from diffusers import ControlNetModel, T2IAdapter

    path = local_folder(spec)
    if kind == "t2i-adapter" and path.suffix == ".safetensors":
        raise ControlNetError(f"{what} {spec}: a T2I-Adapter is loaded from its diffusers folder (config.json and "
                              "weights); a single file is read as a ControlNet")
    try:
        if path.suffix == ".safetensors" and path.is_file():
            with tempfile.TemporaryDirectory() as config:
                net = ControlNetModel.from_single_file(str(path), config=_config_for(unet, Path(config)),
                                                       local_files_only=True, torch_dtype=dtype)
        elif path.exists() and not path.is_dir():
            raise ControlNetError(f"{what} {spec}: a ControlNet is a folder or a .safetensors file "
                                  "(pickled .ckpt/.pth files are not loaded)")
        else:
            where = path if path.is_dir() else spec
            cls = T2IAdapter if control_class(where, f"{what} {spec}") == "T2IAdapter" else ControlNetModel
            net = cls.from_pretrained(where, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as exc:  # the last two: not a ControlNet file
        hint = (" A single file is read as a ControlNet for this UNet (the original release's layout, the standard "
                "condition encoder); another kind needs its diffusers folder." if path.suffix == ".safetensors" else "")
        raise ControlNetError(f"{what} {spec}: cannot load a ControlNet or T2I-Adapter from it "
                              f"({(str(exc).splitlines() or [type(exc).__name__])[0]}).{hint}") from None
    found = "t2i-adapter" if is_adapter(net) else "controlnet"
    if kind is not None and found != kind:
        raise ControlNetError(f"{what} {spec} is a {KINDS[found]}, not a {KINDS[kind]}: method "
                              f"{found.replace('-', '_')} continues it")
    check_fits(net, unet, f"{what} {spec}", latent_scale)
    return net


def control_class(where: Path | str, named: str) -> str:
    """The diffusers class a ControlNet or T2I-Adapter folder (or hub id) holds; any other model is refused by
    its class (diffusers would load it as meta tensors and fail on the first copy)."""
    from diffusers import ControlNetModel

    class_name = ControlNetModel.load_config(where).get("_class_name")
    if class_name not in ("ControlNetModel", "T2IAdapter"):
        raise ControlNetError(f"{named} holds a {class_name or 'model without a _class_name'}, not a ControlNet or "
                              "T2I-Adapter")
    return class_name


def _config_for(unet, folder: Path) -> str:
    """The diffusers config of a ControlNet that steers `unet`, written into `folder`. A single file holds
    weights only, and diffusers otherwise fetches SD 1.5's canny ControlNet config from the Hub: offline that
    fails, and an SD 2.x ControlNet (difftrain's own export from an SD 2 base too) got SD 1.5's widths."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    with init_empty_weights():  # the structure only: no memory
        ControlNetModel.from_unet(unet, load_weights_from_unet=False).save_config(folder)
    return str(folder)


def control_pipeline(pipe, nets: list, img2img: bool):
    """The ControlNet (text2image or img2img) or T2I-Adapter pipeline around `pipe`'s own components."""
    from diffusers import (StableDiffusionAdapterPipeline, StableDiffusionControlNetImg2ImgPipeline,
                           StableDiffusionControlNetPipeline)

    adapters = [net for net in nets if is_adapter(net)]
    if adapters and len(adapters) != len(nets):
        raise ControlNetError("ControlNets and T2I-Adapters together: diffusers has no pipeline for both; use one kind")
    one = nets[0] if len(nets) == 1 else nets
    if adapters:
        if img2img:
            raise ControlNetError("a T2I-Adapter with --init-image: diffusers has no img2img T2I-Adapter pipeline")
        parts = {name: pipe.components[name] for name in
                 ("vae", "text_encoder", "tokenizer", "unet", "scheduler", "safety_checker", "feature_extractor")}
        return StableDiffusionAdapterPipeline(**parts, adapter=one, requires_safety_checker=False)
    cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
    return cls(**pipe.components, controlnet=one, requires_safety_checker=False)


def condition_channels(net) -> int:
    """How many channels the network's condition has: 3 (RGB), or 1 for the grey-scale T2I-Adapters
    (TencentARC's canny and sketch)."""
    return int(net.config["in_channels" if is_adapter(net) else "conditioning_channels"])


def condition_scale(net) -> int:
    """How many condition pixels make one latent: a ControlNet's hint encoder halves the size at each block past
    its first, an adapter pixel-unshuffles by its downscale_factor."""
    if is_adapter(net):
        return int(net.config.get("downscale_factor", 8))
    return 2 ** (len(net.config["conditioning_embedding_out_channels"]) - 1)


def check_fits(net, unet, name: str, latent_scale: int | None = None) -> None:
    """A ControlNet adds its residuals to this UNet's blocks, an adapter its features: the widths must be the UNet's,
    and the condition, shrunk by the network's own factor, must come out at the latent size (`latent_scale`, the
    VAE's factor, when known). And its condition must be one the pipelines can feed it."""
    if latent_scale is not None and condition_scale(net) != latent_scale:
        raise ControlNetError(f"{name}: it shrinks its condition {condition_scale(net)}x, and this model's VAE makes "
                              f"a latent of every {latent_scale}x{latent_scale} pixels: it was made for a base with "
                              "another VAE")
    channels, allowed = condition_channels(net), (1, 3) if is_adapter(net) else (3,)
    if channels not in allowed:
        # diffusers' ControlNet pipelines convert every condition to RGB; its adapter pipeline keeps grey as grey
        fed = "1 or 3 (a grey or an RGB image)" if len(allowed) > 1 else "3 (an RGB image)"
        raise ControlNetError(f"{name}: its condition has {channels} channels; difftrain feeds {fed}")
    if is_adapter(net):
        pairs = [("channels", feature_widths(net), "block_out_channels", "feature widths")]
    else:
        pairs = [(key, net.config[key], key, meaning) for key, meaning in (
            ("cross_attention_dim", "text conditioning width"), ("in_channels", "latent channels"),
            ("block_out_channels", "block widths"))]
    for key, value, unet_key, meaning in pairs:
        ours, theirs = _as_list(value), _as_list(unet.config[unet_key])
        if ours != theirs:
            raise ControlNetError(f"{name}: its {meaning} ({key}) is {_show(ours)}, the model's UNet has "
                                  f"{_show(theirs)}: it was trained for another base (an SD 1.x ControlNet on SD 1.x, "
                                  "SD 2.x on SD 2.x)")


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _show(values: list) -> str:
    return str(values[0]) if len(values) == 1 else str(tuple(values))


def local_folder(spec: str) -> Path:
    """`spec` as a path; a difftrain run folder stands for its final model."""
    from difftrain.run_folder import final_model_dir, is_run_folder

    path = Path(spec)
    return final_model_dir(path) if is_run_folder(path) else path
