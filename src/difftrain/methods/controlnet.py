"""ControlNet: a copy of the UNet's encoder that reads a conditioning image and steers the frozen model.

Everything about Stable Diffusion (loading, caching, captions, the noise objective, the
frozen parts in the compute dtype) is text2image's; this method adds the ControlNet (made
from the base UNet, or an existing one continued), feeds it each item's conditioning
image, and writes a ControlNet folder (and optionally its original-layout single file)
with a manifest naming the base. The UNet, VAE and text encoder stay frozen; a LoRA on the
UNet may train beside the ControlNet. At every sample step the validation pairs are drawn
and their agreement with their conditioning images measured (mask IoU, edge F1), so a
run that "ignores the condition" shows it as a number, not only in pictures.

T2I-Adapter (methods/t2i_adapter.py) is this method with another network: it overrides
what the network is, how its output enters the UNet, and the pipeline that draws with it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from PIL import Image

from difftrain.data.conditioning import Preprocess, grey
from difftrain.data.folder import ConditioningFiles
from difftrain.methods.base import Method
from difftrain.methods.text2image import TextToImage, _autocast_call


log = logging.getLogger(__name__)


class ControlNetTraining(TextToImage):
    name = "controlnet"
    kind = "controlnet"  # the manifest's
    scale_argument = "controlnet_conditioning_scale"  # the pipeline's name for the network's weight

    def __init__(self, config):
        self.control = config.control  # this method's section: controlnet, or t2i_adapter
        self.inherited_scale = 1.0  # the weight a continued network carries in its weights already (add_modules)
        super().__init__(config)
        self.caption_dropout = self.control.proportion_empty_prompts
        if not self.lora:
            self.unet.requires_grad_(False)  # (a LoRA froze the UNet's own weights already)
        self.preprocess = Preprocess(self.control.preprocess, self.control.canny_low_threshold,
                                     self.control.canny_high_threshold, self.control.annotator_path)
        self.validation_images: list[Image.Image] = []

    def add_modules(self) -> None:
        from difftrain.models.control import condition_channels, load_control

        if self.control.model:
            self.net = load_control(self.control.model, torch.float32, self.unet, what=f"{self.name}.model",
                                    kind=self.kind, latent_scale=2 ** (len(self.vae.config.block_out_channels) - 1))
            self._note_folded_weight()
        else:
            self.net = self.new_network()
        self.net.requires_grad_(True)
        self.grey = condition_channels(self.net) == 1  # a grey-scale adapter continued (new networks read RGB)

    def _note_folded_weight(self) -> None:
        """A difftrain ControlNet saved from a run at another conditioning_scale carries that weight in its zero
        convolutions: a continued run's own weight multiplies it."""
        from difftrain.models.control import local_folder
        from difftrain.models.manifest import read_manifest

        folder = local_folder(self.control.model)
        manifest = read_manifest(folder) if folder.is_dir() else None
        trained = manifest.controls[0] if manifest is not None and manifest.controls else {}
        folded = trained.get("folded_scale", 1.0)
        self.inherited_scale = folded
        # A T2I-Adapter's weight is not folded into it: its manifest carries it, and generate draws at it.
        if (manifest is not None and manifest.kind == "t2i-adapter"
                and trained.get("scale", 1.0) != self.control.conditioning_scale):
            log.warning("%s.model %s was trained and is drawn at conditioning_scale %g: this run trains it at "
                        "%s.conditioning_scale %g; set that to %g to continue as it was", self.name,
                        self.control.model, trained["scale"], self.name, self.control.conditioning_scale,
                        trained["scale"])
        if folded != 1.0 and self.control.conditioning_scale != 1.0:
            log.warning("%s.model %s was trained at conditioning_scale %g, saved folded into its weights: at "
                        "%s.conditioning_scale %g this run trains it at %g of its original strength", self.name,
                        self.control.model, folded, self.name, self.control.conditioning_scale,
                        folded * self.control.conditioning_scale)

    def new_network(self):
        from difftrain.models.control import controlnet_from_unet

        return controlnet_from_unet(self.unet, len(self.vae.config.block_out_channels))

    # ----------------------------------------------------------------- what trains
    def trainable_modules(self) -> dict[str, torch.nn.Module]:
        return {self.name: self.net, **({"unet": self.unet} if self.lora else {})}

    def parameter_groups(self, learning_rate: float) -> list[dict]:
        return Method.parameter_groups(self, learning_rate)  # one group: text2image's text-encoder split is moot

    def speed_modules(self) -> dict[str, torch.nn.Module]:
        # Gradients reach the ControlNet through the UNet: checkpointing and attention apply to both.
        return {self.name: self.net, "unet": self.unet}

    def build_dataset(self, progress: bool):
        from difftrain.training.run_data import open_images

        self.preprocess.check(f"{self.name}.preprocess")
        folder = Path(self.control.conditioning_dir) if self.control.conditioning_dir else None
        files = ConditioningFiles(self.control.conditioning_column, folder)
        return open_images(self.config, progress=progress, conditioning=(files, self.preprocess))

    def setup(self, accelerator, weight_dtype, dataset, progress) -> None:
        if self.config.output.single_file:
            from difftrain.config import ConfigError
            from difftrain.models.single_file import SingleFileError, controlnet_rules

            try:  # refused now rather than after the last step
                controlnet_rules(self.net.state_dict())
            except SingleFileError as reason:
                raise ConfigError(f"output.single_file: {reason}") from None
        for number, pair in enumerate(self.control.validation):  # before the latent cache fills, not hours after
            if not Path(pair.image).is_file():
                from difftrain.config import ConfigError

                raise ConfigError(f"{self.name}.validation[{number}].image = {pair.image}: no such file")
        super().setup(accelerator, weight_dtype, dataset, progress)
        self.net.to(accelerator.device)  # trained: stays fp32 whatever the compute dtype (made or loaded so)
        size = self.config.data.resolution
        self.validation_images = [self._condition_at(pair.image, size) for pair in self.control.validation]
        if self.grey:
            self.validation_images = [image.convert("L") for image in self.validation_images]

    def _condition_at(self, path: str, size: int) -> Image.Image:
        """A validation image as the ControlNet reads it: cropped like generate's, then preprocessed."""
        from difftrain.data.conditioning import condition_image, load_condition

        return condition_image(load_condition(path, self.preprocess), (size, size), self.preprocess)

    # ----------------------------------------------------------------- the objective
    def denoiser(self, modules, batch: dict, embeds: torch.Tensor):
        unet, net = modules.get("unet", self.unet), modules[self.name]
        condition = batch["conditioning_pixels"].to(self.device)
        if self.grey:  # (on the device: a host conversion of the whole batch every step would be in the way)
            condition = grey(condition)
        condition = condition.to(torch.float32) / 255.0
        mixed = self.weight_dtype != torch.float32 and "unet" not in modules
        dtype = self.weight_dtype

        def predict(x, t):
            residuals = in_dtype(self.residuals(net, x, t, embeds, condition), dtype)
            return _autocast_call(unet, mixed, dtype, x, t, embeds, **residuals)

        return predict

    def residuals(self, net, x, t, embeds, condition) -> dict:
        """What the network adds to the UNet's call, by the UNet's argument names."""
        down, mid = net(x, t, encoder_hidden_states=embeds, controlnet_cond=condition,
                        conditioning_scale=self.control.conditioning_scale, return_dict=False)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}

    # ----------------------------------------------------------------- previews
    def validation_prompts(self) -> list[str]:
        return [pair.prompt for pair in self.control.validation]

    def pipeline(self, modules, scheduler=None, vae=None, text_encoder=None):
        from difftrain.models.control import control_pipeline

        plain = super().pipeline(modules, scheduler, vae, text_encoder)
        return control_pipeline(plain, [modules.get(self.name, self.net)], img2img=False)

    def sample(self, modules, num_images, scheduler, steps, seed) -> list[Image.Image]:
        net = modules.get(self.name, self.net)
        # accelerate returns a trained module's outputs in float32; the pipeline hands them to the
        # frozen UNet as they are, where they would meet half-precision weights (see denoiser).
        dtype = self.weight_dtype
        handle = net.register_forward_hook(lambda module, args, out: in_dtype(out, dtype)) \
            if dtype != torch.float32 else None
        try:
            return super().sample(modules, num_images, scheduler, steps, seed)
        finally:
            if handle is not None:
                handle.remove()

    def validation_extras(self, number: int) -> dict:
        return {"image": self.validation_images[number], self.scale_argument: self.control.conditioning_scale}

    def sample_scores(self, images: list[Image.Image]) -> dict[str, float]:
        """The validation images' mean agreement with their conditioning images, where one is defined."""
        from difftrain.evaluate.control import agreement

        values = [agreement(self.preprocess, condition, image) for condition, image in zip(self.validation_images, images)]
        values = [v for v in values if v is not None]
        if not values:
            return {}
        name = values[0][0]
        return {name: sum(value for _, value in values) / len(values)}

    # ----------------------------------------------------------------- outputs
    # A ControlNet's residuals leave through linear zero convolutions, so its training weight is folded into them
    # when saved (and drawn at 1); an adapter's cannot be, and its manifest carries the weight instead.
    folds_scale = True

    def saved_scale(self) -> float:
        """The weight the saved network is to be drawn at."""
        return 1.0 if self.folds_scale else self.control.conditioning_scale

    def network_to_save(self, net):
        from difftrain.models.control import with_weight_applied

        scale = self.control.conditioning_scale
        return with_weight_applied(net, scale) if self.folds_scale and scale != 1.0 else net

    def save_model(self, modules, out_dir: Path) -> None:
        net = self.network_to_save(modules.get(self.name, self.net))
        out_dir.mkdir(parents=True, exist_ok=True)
        net.save_pretrained(out_dir, safe_serialization=True)
        self.saved_scheduler().save_pretrained(out_dir / "scheduler")
        facts = {key: str(value) for key, value in self.training_facts().items()}
        facts["preprocess"] = self.preprocess.name
        if self.lora:
            from difftrain.models.lora_files import save_lora

            save_lora(out_dir, modules.get("unet", self.unet), None, metadata=self.training_facts())
        if self.config.output.single_file:
            from difftrain.models.single_file import save_controlnet_single_file

            dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
            save_controlnet_single_file(net, out_dir / "controlnet.safetensors",
                                        dtype[self.config.output.single_file_dtype], facts)

    def describe_adapter(self, manifest) -> None:
        manifest.kind = self.kind  # (text2image's manifest then names the base it needs)
        manifest.controls = [{"folder": ".", "scale": self.saved_scale(), "preprocess": self.preprocess.name}]
        folded = self.inherited_scale * (self.control.conditioning_scale if self.folds_scale else 1.0)
        if folded != 1.0:  # in the weights: this run's own (network_to_save) times what it started from
            manifest.controls[0]["folded_scale"] = folded
        if self.preprocess.name == "canny":
            manifest.controls[0].update(low_threshold=self.preprocess.low_threshold,
                                        high_threshold=self.preprocess.high_threshold)

    def describe(self) -> list[str]:
        source = self.control.model or "new, for the base UNet"
        return super().describe() + [f"{self.name}: {source}; condition: {self.preprocess.name}; "
                                     f"{len(self.control.validation)} validation pair(s)"]


def in_dtype(value, dtype: torch.dtype):
    """Every tensor in `value` (a tensor, or lists, tuples and dicts of them) in `dtype`."""
    if torch.is_tensor(value):
        return value.to(dtype)
    if isinstance(value, dict):
        return {key: in_dtype(item, dtype) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(in_dtype(item, dtype) for item in value)
    return value
