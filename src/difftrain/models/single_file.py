"""Stable Diffusion as ONE .safetensors with the original (LDM/CompVis) key names.

This is the file AUTOMATIC1111, ComfyUI, InvokeAI and diffusers' own `from_single_file`
load: `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and the text encoder,
`cond_stage_model.transformer.text_model.*` for SD 1.x's CLIP and OpenCLIP's own names under
`cond_stage_model.model.*` for SD 2.x's; and a ControlNet alone as the `control_model.*` file
of the original ControlNet release.

The diffusers -> LDM renaming is the well-known one of diffusers'
scripts/convert_diffusers_to_original_stable_diffusion.py, rewritten here as prefix tables
that are built by walking the model's own blocks, so any number of levels and
layers_per_block converts (that script hard-codes SD 1.5's 4 levels x 2 layers). Every
tensor must be renamed: a key no rule covers is an error, never a silent drop.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from difftrain.atomic import write_safetensors
from difftrain.errors import DifftrainError
from difftrain.sampling.prompts import is_open_clip

UNET_PREFIX = "model.diffusion_model."
CONTROLNET_PREFIX = "control_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer.text_model."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
# transformers' CLIP names -> OpenCLIP's, inside a block (the query, key and value are joined apart).
OPEN_CLIP_BLOCK = (("self_attn.out_proj.", "attn.out_proj."), ("layer_norm1.", "ln_1."), ("layer_norm2.", "ln_2."),
                   ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj."))
OPEN_CLIP_H_BLOCKS = 24  # SD 2.x's encoder: diffusers' copy keeps the first 23, the output SD reads

# Inside a block, the names that differ (diffusers -> LDM). Unlisted names are the same.
UNET_RESNET = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
)
VAE_RESNET = (("conv_shortcut.", "nin_shortcut."),)
VAE_ATTENTION = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)

# A rule: (diffusers prefix, LDM prefix, renames inside that prefix).
Rule = tuple[str, str, tuple[tuple[str, str], ...]]


class SingleFileError(DifftrainError):
    """The models cannot be written as an LDM single file (an unknown layout, a bad path)."""


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def _has(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def unet_rules(keys) -> list[Rule]:
    """LDM numbers the UNet's layers in one running sequence: input_blocks.N holds a resnet
    (+ its attention at .1) or a downsampler; output_blocks.N holds a resnet (+ attention)
    and, on a level's last layer, the upsampler after them."""
    rules: list[Rule] = [
        ("time_embedding.linear_1.", "time_embed.0.", ()),
        ("time_embedding.linear_2.", "time_embed.2.", ()),
        ("conv_in.", "input_blocks.0.0.", ()),
        ("conv_norm_out.", "out.0.", ()),
        ("conv_out.", "out.2.", ()),
    ]
    block = 1
    for i in _indices(keys, r"down_blocks\.(\d+)\."):
        for j in _indices(keys, rf"down_blocks\.{i}\.resnets\.(\d+)\."):
            rules.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", UNET_RESNET))
            rules.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", ()))
            block += 1
        if _has(keys, f"down_blocks.{i}.downsamplers.0."):
            rules.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{block}.0.op.", ()))
            block += 1
    # The middle alternates resnet, attention, resnet: middle_block.0 / .1 / .2.
    for j in _indices(keys, r"mid_block\.resnets\.(\d+)\."):
        rules.append((f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.", UNET_RESNET))
        rules.append((f"mid_block.attentions.{j}.", f"middle_block.{2 * j + 1}.", ()))
    block = 0
    for i in _indices(keys, r"up_blocks\.(\d+)\."):
        for j in _indices(keys, rf"up_blocks\.{i}\.resnets\.(\d+)\."):
            rules.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", UNET_RESNET))
            rules.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", ()))
            block += 1
        slot = 2 if _has(keys, f"up_blocks.{i}.attentions.") else 1
        rules.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{block - 1}.{slot}.", ()))
    return rules


def vae_rules(keys) -> list[Rule]:
    """LDM's decoder counts its levels from the bottom (up.0 is the last to run), diffusers'
    from the top; both mid blocks are resnet, attention, resnet."""
    rules: list[Rule] = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", ()),
        ("decoder.conv_norm_out.", "decoder.norm_out.", ()),
    ]
    rules += [(p, p, ()) for p in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.")]
    rules += [(p, p, ()) for p in ("quant_conv.", "post_quant_conv.")]
    for i in _indices(keys, r"encoder\.down_blocks\.(\d+)\."):
        for j in _indices(keys, rf"encoder\.down_blocks\.{i}\.resnets\.(\d+)\."):
            rules.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET))
        rules.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", ()))
    ups = _indices(keys, r"decoder\.up_blocks\.(\d+)\.")
    for i in ups:
        ldm = len(ups) - 1 - i
        for j in _indices(keys, rf"decoder\.up_blocks\.{i}\.resnets\.(\d+)\."):
            rules.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{ldm}.block.{j}.", VAE_RESNET))
        rules.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{ldm}.upsample.", ()))
    for part in ("encoder", "decoder"):
        for j in _indices(keys, rf"{part}\.mid_block\.resnets\.(\d+)\."):
            rules.append((f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", VAE_RESNET))
        rules.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION))
    return rules


def controlnet_rules(keys) -> list[Rule]:
    """The original ControlNet (lllyasviel's cldm) names: the UNet's encoder half as in the UNet,
    plus the hint encoder (convolutions at the even places of one Sequential, SiLUs between),
    one zero convolution per encoder output (`zero_convs.N.0`) and the middle's (`middle_block_out.0`)."""
    encoder = [rule for rule in unet_rules(keys) if not rule[1].startswith(("output_blocks.", "out."))]
    blocks = _indices(keys, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
    if blocks != list(range(6)):
        # cldm's hint encoder has 3 halvings (6 convolutions between in and out), and readers
        # take its last convolution at input_hint_block.14: another depth has no original name.
        raise SingleFileError(f"controlnet: its condition encoder has {len(blocks)} inner convolutions, the original "
                              "layout has 6 (conditioning_embedding_out_channels of 4 entries, 8x down); save it as a "
                              "diffusers folder instead")
    rules: list[Rule] = [
        ("controlnet_cond_embedding.conv_in.", "input_hint_block.0.", ()),
        *[(f"controlnet_cond_embedding.blocks.{k}.", f"input_hint_block.{2 * k + 2}.", ()) for k in blocks],
        ("controlnet_cond_embedding.conv_out.", f"input_hint_block.{2 * len(blocks) + 2}.", ()),
        *[(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0.", ())
          for i in _indices(keys, r"controlnet_down_blocks\.(\d+)\.")],
        ("controlnet_mid_block.", "middle_block_out.0.", ()),
    ]
    return rules + encoder


def controlnet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _convert(state, controlnet_rules(state), CONTROLNET_PREFIX, "controlnet")


def save_controlnet_single_file(controlnet, path: str | Path, dtype: torch.dtype | None = None,
                                metadata: dict[str, str] | None = None) -> Path:
    """A ControlNetModel as one .safetensors in the original `control_model.*` layout, the file
    AUTOMATIC1111's ControlNet extension and ComfyUI load (and diffusers' from_single_file)."""
    return _write(controlnet_to_ldm(controlnet.state_dict()), path, dtype, metadata)


def _rename(key: str, rules: list[Rule]) -> str | None:
    for hf, ldm, inner in rules:
        if key.startswith(hf):
            rest = key[len(hf) :]
            for old, new in inner:
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            return ldm + rest
    return None


def _convert(state: dict[str, torch.Tensor], rules: list[Rule], prefix: str, what: str) -> dict[str, torch.Tensor]:
    out, unmapped = {}, []
    for key, tensor in state.items():
        new = _rename(key, rules)
        if new is None:
            unmapped.append(key)
        else:
            out[prefix + new] = tensor
    if unmapped:
        raise SingleFileError(
            f"{what}: {len(unmapped)} weights have no Stable Diffusion (LDM) name, e.g. {unmapped[:3]}; "
            "only SD 1.x/2.x-style UNet2DConditionModel / AutoencoderKL layouts can be written as a single file "
            "(save it as a diffusers folder instead)"
        )
    if len(out) != len(state):  # two diffusers names onto one LDM name would lose a tensor
        raise SingleFileError(f"{what}: the LDM renaming collides ({len(state)} weights -> {len(out)} names)")
    return out


def unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return _convert(state, unet_rules(state), UNET_PREFIX, "unet")


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = _convert(state, vae_rules(state), VAE_PREFIX, "vae")
    # LDM's VAE mid-block attention is built from 1x1 convolutions, diffusers' from linears.
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            if tensor.ndim == 2:
                out[key] = tensor[:, :, None, None]
    return out


def text_encoder_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # CLIP keeps its Hugging Face names in LDM files; only the prefix differs. transformers
    # >= 5.6 dropped the inner "text_model." from CLIPTextModel, older ones still have it.
    return {TEXT_PREFIX + k.removeprefix("text_model."): v for k, v in state.items()}


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 2.x's text encoder (OpenCLIP ViT-H, held by diffusers in transformers' CLIP layout) under the
    OpenCLIP names SD 2 checkpoints use: AUTOMATIC1111 tells an SD 2 file by them, and ComfyUI's SD 2
    loader reads only keys under `cond_stage_model.model.`. The reverse of diffusers' own
    convert_open_clip_checkpoint (tested through it)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {"token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias")}
    blocks = len({key.split(".")[2] for key in state if key.startswith("encoder.layers.")})
    for block in range(blocks):
        ours, theirs = f"encoder.layers.{block}.", f"transformer.resblocks.{block}."
        for kind in ("weight", "bias"):
            out[f"{theirs}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{ours}self_attn.{part}_proj.{kind}") for part in ("q", "k", "v")])
        for key in [key for key in state if key.startswith(ours)]:
            name = key.removeprefix(ours)
            for diffusers_name, open_clip_name in OPEN_CLIP_BLOCK:
                name = name.replace(diffusers_name, open_clip_name)
            out[theirs + name] = state.pop(key)
    if state:
        raise SingleFileError(f"text encoder: no OpenCLIP name for {sorted(state)[:3]}")
    if blocks == OPEN_CLIP_H_BLOCKS - 1:
        # The block diffusers dropped and the projection SD never uses: AUTOMATIC1111 and ComfyUI build the
        # whole OpenCLIP model, so they are written as kohya's converter writes them (a copy of the block before,
        # an identity); every loader then reads the penultimate block's output, as SD 2 trained on.
        last, dropped = f"transformer.resblocks.{blocks - 1}.", f"transformer.resblocks.{blocks}."
        out |= {dropped + key.removeprefix(last): value.clone() for key, value in out.items() if key.startswith(last)}
    width = out["token_embedding.weight"].shape[1]
    # diffusers reads the width of the query, key and value rows from the projection's first dimension.
    out["text_projection"] = torch.eye(width, dtype=out["token_embedding.weight"].dtype)
    return {OPEN_CLIP_PREFIX + key: value for key, value in out.items()}


def to_ldm_state_dict(unet, vae, text_encoder) -> dict[str, torch.Tensor]:
    """All three models' weights under their LDM names (tensors shared, not copied)."""
    parts = [unet_to_ldm(unet.state_dict()), vae_to_ldm(vae.state_dict())]
    convert = open_clip_to_ldm if is_open_clip(text_encoder) else text_encoder_to_ldm
    parts.append(convert(text_encoder.state_dict()))
    merged = {k: v for part in parts for k, v in part.items()}
    assert len(merged) == sum(map(len, parts)), "the three prefixes cannot collide"
    return merged


def save_single_file(
    unet,
    vae,
    text_encoder,
    path: str | Path,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
    noise: dict | None = None,
) -> Path:
    """Write unet + vae + text_encoder as one LDM-keyed .safetensors at `path`, atomically.

    `dtype` casts the floating-point weights (torch.float16 halves the file, the usual
    distribution format); `metadata` lands in the safetensors header as strings.

    `noise` (the scheduler's config) says what the model predicts, which its keys cannot. A
    v-prediction model and any SD 2.x model get their LDM config beside the file (PATH.yaml,
    what AUTOMATIC1111 reads before guessing, and what ComfyUI's config loader and diffusers'
    `original_config` take); a v-prediction or zero-terminal-SNR model also carries the empty
    `v_pred` / `ztsnr` keys Forge looks for (ComfyUI, for SDXL models only), which difftrain reads back.
    """
    state = to_ldm_state_dict(unet, vae, text_encoder)
    v_prediction = bool(noise) and noise.get("prediction_type") == "v_prediction"
    if v_prediction:
        state["v_pred"] = torch.tensor([])
    if noise and noise.get("rescale_betas_zero_snr"):
        state["ztsnr"] = torch.tensor([])
    written = _write(state, path, dtype, metadata)
    if v_prediction or is_open_clip(text_encoder):
        import yaml

        from difftrain.atomic import write_text

        config = ldm_config(unet, vae, text_encoder, noise or {})
        write_text(written.with_suffix(".yaml"), yaml.safe_dump(config, sort_keys=False))
    return written


def ldm_config(unet, vae, text_encoder, noise: dict) -> dict:
    """The original LDM inference config (v1-inference.yaml, v2-inference[-v].yaml) describing these models."""
    u, v = unet.config, vae.config
    base = u.block_out_channels[0]
    heads = u.attention_head_dim if isinstance(u.attention_head_dim, int) else u.attention_head_dim[0]
    depth = u.transformer_layers_per_block
    unet_params = {
        "use_checkpoint": True, "image_size": u.sample_size, "in_channels": u.in_channels,
        "out_channels": u.out_channels, "model_channels": base,
        # LDM counts a level by its downsampling factor: attention at levels 0-2 is [1, 2, 4].
        "attention_resolutions": [2**i for i, kind in enumerate(u.down_block_types) if "CrossAttn" in kind],
        "num_res_blocks": u.layers_per_block, "channel_mult": [c // base for c in u.block_out_channels],
        "use_spatial_transformer": True, "transformer_depth": depth if isinstance(depth, int) else list(depth),
        "context_dim": u.cross_attention_dim, "legacy": False,
    }
    if u.use_linear_projection:  # SD 2.x: heads of 64 channels; diffusers' attention_head_dim counts heads there
        unet_params.update(num_head_channels=base // heads, use_linear_in_transformer=True)
    else:
        unet_params["num_heads"] = heads  # SD 1.x: diffusers' attention_head_dim is the number of heads
    ch = v.block_out_channels[0]
    ddconfig = {"double_z": True, "z_channels": v.latent_channels, "resolution": v.sample_size, "in_channels": 3,
                "out_ch": 3, "ch": ch, "ch_mult": [c // ch for c in v.block_out_channels],
                "num_res_blocks": v.layers_per_block, "attn_resolutions": [], "dropout": 0.0}
    open_clip = is_open_clip(text_encoder)
    cond_stage = ({"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                   "params": {"freeze": True, "layer": "penultimate"}} if open_clip
                  else {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"})
    params = {
        "linear_start": float(noise.get("beta_start", 0.00085)), "linear_end": float(noise.get("beta_end", 0.012)),
        "num_timesteps_cond": 1, "log_every_t": 200, "timesteps": int(noise.get("num_train_timesteps", 1000)),
        "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": u.sample_size, "channels": u.in_channels,
        "cond_stage_trainable": False, "conditioning_key": "crossattn", "monitor": "val/loss_simple_ema",
        "scale_factor": float(v.scaling_factor), "use_ema": False,
    }
    if noise.get("prediction_type") == "v_prediction":
        params["parameterization"] = "v"
    params |= {
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet_params},
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": v.latent_channels, "monitor": "val/rec_loss",
                                          "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}},
        "cond_stage_config": cond_stage,
    }
    return {"model": {"base_learning_rate": 1.0e-4, "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": params}}


def _write(state: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype | None,
           metadata: dict[str, str] | None) -> Path:
    path = Path(path)
    if path.suffix != ".safetensors":
        raise SingleFileError(f"{path}: a single-file checkpoint must end in .safetensors")
    metadata = {"format": "pt", **(metadata or {})}
    bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
    if bad:
        raise SingleFileError(f"{path}: metadata values must be strings (json.dumps them); not strings: {bad}")
    tensors = {}
    for key, tensor in state.items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        tensors[key] = tensor.contiguous()
    return write_safetensors(path, tensors, metadata)


def load_single_file_components(
    path: str | Path | dict,
    config_dir: str | Path,
    names: tuple[str, ...] = ("unet", "vae", "text_encoder"),
    dtype: torch.dtype | None = None,
    source: str | None = None,
) -> dict:
    """Load models from an LDM single file through diffusers' own single-file loaders.

    `config_dir` is a local diffusers pipeline folder of the same architecture: the file
    holds only weights, and naming a folder here is what keeps diffusers from going to the
    Hub for the configs. `path` may also be an already loaded LDM state dict (`source`
    then names it in errors).
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm, load_single_file_checkpoint

    checkpoint = path if isinstance(path, dict) else load_single_file_checkpoint(str(path), local_files_only=True)
    config_dir = str(config_dir)
    # For float32, cast afterwards with .float(): diffusers' torch_dtype path ends in a
    # model.to(dtype) that logs a bogus "modules that should be kept in float32: []".
    full = dtype in (None, torch.float32)
    common = dict(config=config_dir, local_files_only=True, torch_dtype=None if full else dtype)
    where = source or ("the given state dict" if isinstance(path, dict) else str(path))
    loaded = {}
    for name in names:
        lacks = f"{name}: {where} lacks weights that {config_dir}/{name} describes"
        try:
            if name == "unet":
                loaded[name] = UNet2DConditionModel.from_single_file(checkpoint, subfolder="unet", **common,
                                                                     **_input_channels(checkpoint, config_dir))
            elif name == "vae":
                loaded[name] = AutoencoderKL.from_single_file(checkpoint, subfolder="vae", **common)
            elif name == "text_encoder":
                loaded[name] = create_diffusers_clip_model_from_ldm(
                    _text_encoder_class(config_dir), checkpoint=checkpoint, subfolder="text_encoder", **common
                )
            else:
                raise ValueError(f"unknown component {name!r}")
        except NotImplementedError:  # diffusers moving a model with never-filled meta tensors
            raise SingleFileError(f"{lacks}; give a config folder of the same architecture as the file") from None
        # The model is built on the meta device and filled from the file: a tensor left
        # there is one the file lacks (another architecture than the config, or a cut file).
        missing = [k for k, v in loaded[name].state_dict().items() if v.device.type == "meta"]
        if missing:
            raise SingleFileError(f"{lacks} ({len(missing)}, e.g. {missing[:3]}); give a config of its architecture")
        if dtype is torch.float32:
            loaded[name].float()
    return loaded


def _input_channels(checkpoint: dict, config_dir: str) -> dict:
    """{"in_channels": n} where the file's UNet takes other inputs than its config's: an inpainting model's 9
    (latents, mask, masked image) beside the base model's config folder of 4 (sd-v1-5-inpainting with v1-5's)."""
    import json

    weight = checkpoint.get("model.diffusion_model.input_blocks.0.0.weight")
    config = Path(config_dir) / "unet" / "config.json"
    if weight is None or not config.is_file() or json.loads(config.read_text())["in_channels"] == weight.shape[1]:
        return {}
    return {"in_channels": int(weight.shape[1])}


def _text_encoder_class(config_dir: str):
    import json

    import transformers

    config = Path(config_dir) / "text_encoder" / "config.json"
    arch = (json.loads(config.read_text()).get("architectures") or [""])[0] if config.is_file() else ""
    # The LDM text-encoder layouts diffusers reads are all CLIP, with or without projection.
    clip = ("CLIPTextModel", "CLIPTextModelWithProjection")
    return getattr(transformers, arch) if arch in clip else transformers.CLIPTextModel
