"""Stable Diffusion's parts run by ONNX Runtime, shaped as the torch modules diffusers' pipelines call.

An exported folder follows Hugging Face Optimum's layout (`text_encoder/`, `unet/`,
`vae_encoder/`, `vae_decoder/`, each `model.onnx` and `config.json`, beside `tokenizer/`
and `scheduler/`). Each part here is a `torch.nn.Module` with the config and call
signature of the module it replaces, so diffusers' own pipeline, our schedulers, prompt
weighting, seeds and infotext run unchanged on top: switching backends changes the
speed, not the workflow. Tensors cross to numpy at the session boundary and nothing
else; the scheduler, guidance and noise stay in torch, which is why images match the
torch backend at the same seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from difftrain.errors import DifftrainError

PARTS = ("text_encoder", "unet", "vae_encoder", "vae_decoder")
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}


class OnnxError(DifftrainError):
    pass


def onnxruntime():
    """The onnxruntime module, or an error that says how to get it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxError("ONNX Runtime is not installed: pip install 'difftrain[onnx]' (onnxruntime; "
                        "onnxruntime-gpu for CUDA and TensorRT)") from None
    return ort


def providers(name: str, fallback: bool = False) -> list[str]:
    """ONNX Runtime execution providers for `name` (auto, cpu, cuda, tensorrt), the CPU last as its fallback.

    auto takes CUDA where this onnxruntime has it. A provider it lacks is refused, unless
    `fallback` asks to run on what there is.
    """
    ort = onnxruntime()
    if name not in ("auto", *PROVIDERS):
        raise OnnxError(f"--provider {name}: choose auto or one of {', '.join(PROVIDERS)}")
    wanted = {"auto": ["cuda", "cpu"], "cpu": ["cpu"], "cuda": ["cuda", "cpu"],
              "tensorrt": ["tensorrt", "cuda", "cpu"]}[name]
    available = set(ort.get_available_providers())
    chosen = [PROVIDERS[item] for item in wanted if PROVIDERS[item] in available]
    if name != "auto" and PROVIDERS[name] not in available and not fallback:
        raise OnnxError(f"--provider {name}: this onnxruntime has no {PROVIDERS[name]} (it has "
                        f"{', '.join(sorted(available))}); install onnxruntime-gpu (TensorRT also needs TensorRT "
                        f"itself), or pass --provider-fallback to run on {chosen[0]}")
    return chosen


def session(path: Path, provider_list: list[str]):
    ort = onnxruntime()
    if not path.is_file():
        raise OnnxError(f"{path}: missing; the ONNX export is incomplete (export it again)")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as many as torch uses, not one per core of the host
    return ort.InferenceSession(str(path), sess_options=options, providers=provider_list)


class _Part(torch.nn.Module):
    """What diffusers asks of a component besides calling it: a config, a device and a dtype."""

    def __init__(self, folder: Path, provider_list: list[str]):
        super().__init__()
        self.folder = folder
        self.session = session(folder / "model.onnx", provider_list)
        # name -> the numpy dtype the graph declares (exports differ: int32 or int64 ids, float or int timesteps)
        self.inputs = {item.name: _NUMPY.get(item.type, np.float32) for item in self.session.get_inputs()}
        self.outputs = [item.name for item in self.session.get_outputs()]
        raw = json.loads((folder / "config.json").read_text())
        self.config = _Config(raw)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # tensors enter and leave a session as numpy on the host

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32  # an fp16 export keeps float32 inputs and outputs

    def run(self, names: list[str] | None, feed: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        arrays = {name: value.detach().cpu().numpy().astype(self.inputs[name], copy=False) for name, value in feed.items()}
        return [torch.from_numpy(np.ascontiguousarray(out)) for out in self.session.run(names, arrays)]


_NUMPY = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int32)": np.int32,
          "tensor(int64)": np.int64}


class _Config(dict):
    """A config readable both as `config["key"]` and `config.key`, as diffusers' FrozenDict."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class OnnxTextEncoder(_Part):
    """CLIP's text model: `last_hidden_state`, `pooler_output` and every layer's hidden state."""

    def __init__(self, folder: Path, provider_list: list[str]):
        super().__init__(folder, provider_list)
        # Clip skip runs a middle layer through the final norm, as the torch encoder does; the norm
        # is kept beside the graph (safetensors) because ONNX holds it under an exporter-made name.
        # An export from elsewhere without it draws with clip skip 1 only.
        norm_file = folder / "final_layer_norm.safetensors"
        if norm_file.is_file():
            from safetensors.torch import load_file

            norm = load_file(norm_file)
            self.final_layer_norm = torch.nn.LayerNorm(norm["weight"].shape[0],
                                                       eps=self.config.get("layer_norm_eps", 1e-5))
            self.final_layer_norm.load_state_dict(norm)

    def forward(self, input_ids, attention_mask=None, output_hidden_states: bool = False, return_dict: bool = True,
                **_):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        values = dict(zip(self.outputs, self.run(None, {"input_ids": input_ids})))
        hidden = tuple(values[name] for name in self.outputs if name.startswith("hidden_states."))
        if output_hidden_states and not hidden:
            raise OnnxError(f"{self.folder}: this text encoder graph gives no hidden states (an export from "
                            "elsewhere); clip skip needs a difftrain export")
        output = BaseModelOutputWithPooling(last_hidden_state=values.get("last_hidden_state", values[self.outputs[0]]),
                                            pooler_output=values.get("pooler_output"),
                                            hidden_states=hidden if output_hidden_states else None)
        return output if return_dict else output.to_tuple()


def latent_cell(unet_config) -> int:
    """The multiple an exported UNet's latent sides must be: traced at a latent every upsampler halves evenly, the
    graph has no odd-size path (diffusers' UNet picks its upsampling size in Python at run time)."""
    return 2 ** (len(unet_config["block_out_channels"]) - 1)


class OnnxUNet(_Part):
    """UNet2DConditionModel's call; with ControlNet residual inputs when it was exported with them."""

    def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, down_block_additional_residuals=None, mid_block_additional_residual=None,
                return_dict: bool = True, **_):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        # Refused here: ONNX Runtime would fail deep inside with mismatched shapes.
        cell = latent_cell(self.config)
        if sample.shape[2] % cell or sample.shape[3] % cell:
            raise OnnxError(f"{self.folder}: an ONNX UNet draws latents whose sides are multiples of {cell} only, "
                            f"and this one is {sample.shape[3]}x{sample.shape[2]}: give a width and height that make "
                            f"them so (multiples of {cell * 8} px with Stable Diffusion's VAE, e.g. 512, 576, 640), "
                            "or use the torch model")
        timestep = torch.as_tensor(timestep).reshape(-1).expand(sample.shape[0])
        feed = {"sample": sample.float(), "timestep": timestep.contiguous(),
                "encoder_hidden_states": encoder_hidden_states.float()}
        if down_block_additional_residuals is not None:
            if "mid_block_residual" not in self.inputs:
                raise OnnxError(f"{self.folder}: this UNet was exported without ControlNet inputs; export it "
                                "again with --controlnet")
            feed.update({f"down_block_residual_{i}": r.float()
                         for i, r in enumerate(down_block_additional_residuals)})
            feed["mid_block_residual"] = mid_block_additional_residual.float()
        elif "mid_block_residual" in self.inputs:
            feed.update(self.zero_residuals(sample))
        (out,) = self.run(["out_sample"], feed)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)

    def zero_residuals(self, sample: torch.Tensor) -> dict[str, torch.Tensor]:
        """A UNet exported for ControlNets, run without one: residuals of zero change nothing."""
        shapes = self.config["_residual_shapes"]  # channels and downsampling of each, from the export
        return {name: sample.new_zeros(sample.shape[0], channels, sample.shape[2] // down, sample.shape[3] // down)
                for name, (channels, down) in shapes.items()}


class OnnxVae(_Part):
    """AutoencoderKL's encode (to its latent distribution) and decode, from two graphs."""

    def __init__(self, folder: Path, provider_list: list[str]):
        super().__init__(folder / "vae_decoder", provider_list)
        self.encoder = session(folder / "vae_encoder" / "model.onnx", provider_list)
        self.encoder_outputs = [item.name for item in self.encoder.get_outputs()]
        self.use_slicing = self.use_tiling = False

    def encode(self, x, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        if "latent_parameters" in self.encoder_outputs:  # ours: the distribution, sampled as torch samples it
            (moments,) = self.encoder.run(["latent_parameters"], {"sample": x.float().cpu().numpy()})
            distribution = DiagonalGaussianDistribution(torch.from_numpy(moments))
        else:  # an export from elsewhere gives one latent; taken as it is
            (latent,) = self.encoder.run(None, {"sample": x.float().cpu().numpy()})[:1]
            latent = torch.from_numpy(latent)
            distribution = DiagonalGaussianDistribution(torch.cat([latent, torch.zeros_like(latent)], 1),
                                                        deterministic=True)
        return AutoencoderKLOutput(latent_dist=distribution) if return_dict else (distribution,)

    def decode(self, z, return_dict: bool = True, generator=None):
        from diffusers.models.autoencoders.vae import DecoderOutput

        (sample,) = self.run(["sample"], {"latent_sample": z.float()})
        return DecoderOutput(sample=sample) if return_dict else (sample,)


def load_onnx_pipeline(folder: Path, provider: str = "auto", fallback: bool = False):
    """A diffusers StableDiffusionPipeline whose text encoder, UNet and VAE are ONNX Runtime sessions."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from difftrain.models.manifest import read_manifest

    folder = Path(folder)
    chosen = providers(provider, fallback)
    missing = [part for part in PARTS if not (folder / part / "model.onnx").is_file()]
    if missing:
        raise OnnxError(f"{folder}: no {', '.join(f'{part}/model.onnx' for part in missing)}; not a complete ONNX "
                        "export (difftrain export MODEL OUT --to onnx writes one)")
    manifest = read_manifest(folder)
    scheduler_folder = folder / ((manifest.scheduler if manifest else None) or "scheduler")
    import diffusers

    saved = diffusers.DDPMScheduler.load_config(scheduler_folder)
    scheduler = getattr(diffusers, saved["_class_name"]).from_config(saved)
    pipe = StableDiffusionPipeline(
        vae=OnnxVae(folder, chosen), text_encoder=OnnxTextEncoder(folder / "text_encoder", chosen),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), unet=OnnxUNet(folder / "unet", chosen),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    active = pipe.unet.session.get_providers()
    if chosen[0] not in active:
        # Listed as available, yet not started: onnxruntime-gpu lists CUDA (and TensorRT) even where their
        # libraries fail to load, logs that, and runs the session on the CPU.
        if provider != "auto" and not fallback:
            raise OnnxError(f"--provider {provider}: ONNX Runtime lists {chosen[0]} but could not start it (its log "
                            "above says why: usually CUDA or cuDNN libraries it cannot load); fix that, or pass "
                            f"--provider-fallback to run on {active[0]}")
        print(f"ONNX Runtime could not start {chosen[0]}: running on {active[0]}", file=sys.stderr)
    pipe.onnx_providers = active
    return pipe


def is_onnx_folder(folder: Path) -> bool:
    return (Path(folder) / "unet" / "model.onnx").is_file()


__all__ = ["OnnxError", "OnnxTextEncoder", "OnnxUNet", "OnnxVae", "is_onnx_folder",
           "load_onnx_pipeline", "onnxruntime", "providers"]
