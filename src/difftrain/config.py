"""The typed run configuration.

A YAML file is parsed into `RunConfig` before anything heavy is imported or loaded, so
a typo costs a second, not a model load. Every error names the key, the value and what
is allowed; `--set section.key=value` overrides go through the same validation.
"""

from __future__ import annotations

import difflib
import shlex
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from difftrain.errors import ConfigError
from difftrain.evaluate.names import METRICS, RESULTS
from difftrain.models.unet import UNET_PRESETS

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_config", "says"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @model_validator(mode="before")
    @classmethod
    def _no_yes_for_a_number(cls, raw: Any) -> Any:
        # pydantic reads true as 1 in a number field: `checkpoint.keep_last: yes` kept one checkpoint, pruning the
        # rest. Given back as the text it was, it fails as text does, the error naming the key.
        if not isinstance(raw, dict):
            return raw
        return {key: str(value).lower() if isinstance(value, bool) and key in cls.model_fields
                and _takes_a_number(cls.model_fields[key].annotation) else value for key, value in raw.items()}


def _takes_a_number(annotation: Any) -> bool:
    """Whether a field of this type takes an int or a float, and never a bool."""
    kinds = typing.get_args(annotation) if typing.get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    return bool({int, float} & set(kinds)) and bool not in kinds


class BucketConfig(Section):
    enabled: bool = Field(False, description="aspect-ratio buckets instead of square crops")
    step: int = Field(64, ge=8, description="bucket sides are multiples of this (pixels)")
    max_ratio: float = Field(2.0, ge=1.0, le=8.0, description="widest/tallest bucket allowed")
    no_upscale: bool = Field(False, description="kohya's bucket_no_upscale: each image gets a bucket of its own size "
                                                "(sides floored to `step`; larger than resolution**2 pixels: scaled "
                                                "down to that area first), so no image is enlarged; max_ratio does "
                                                "not apply")

    @model_validator(mode="after")
    def _step_fits_vae(self) -> "BucketConfig":
        if self.step % 8:
            raise ValueError(f"data.buckets.step = {self.step}: must be a multiple of 8")
        # no_upscale alone left every small image enlarged into a square crop. (step and max_ratio may stay set while
        # buckets are turned off and on: they say nothing on their own.)
        if self.no_upscale and not self.enabled:
            raise ValueError("data.buckets.no_upscale without data.buckets.enabled: true does nothing; set enabled: "
                             "true, or remove it")
        return self


class CacheConfig(Section):
    latents: bool = Field(False, description="encode every image with the VAE once, store the latents on disk")
    text: bool = Field(False, description="encode every caption once, store the embeddings on disk")
    dir: Optional[str] = Field(None, description="cache folder; default <output_dir>/cache. Entries are keyed by content")


class AugmentConfig(Section):
    """Training-time augmentation with torchvision's parameter meanings (see difftrain.data.augment).

    Everything is off by default: a run without this section draws exactly what it drew before.
    """

    crop_scale: Optional[tuple[float, float]] = Field(
        None, description="random-resized crop: [min, max] share of the image's area, e.g. [0.8, 1.0]; it replaces "
                          "data.crop (centre or random); null = off")
    crop_ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="random-resized crop: [min, max] aspect of the crop, relative to the output's "
                                    "(1 = the bucket's own shape)")
    rotation: float = Field(0.0, ge=0, le=180, description="rotate by a uniform angle in [-rotation, rotation] "
                                                           "degrees, zoomed to keep the corners filled; 0 = off")
    brightness: float = Field(0.0, ge=0, description="colour jitter: factor uniform in [max(0, 1-b), 1+b]; 0 = off")
    contrast: float = Field(0.0, ge=0, description="colour jitter: factor uniform in [max(0, 1-c), 1+c]; 0 = off")
    saturation: float = Field(0.0, ge=0, description="colour jitter: factor uniform in [max(0, 1-s), 1+s]; 0 = off")
    hue: float = Field(0.0, ge=0, le=0.5, description="colour jitter: hue turned by a uniform share in [-h, h] of "
                                                      "the circle; 0 = off")
    probability: float = Field(1.0, ge=0, le=1, description="share of samples augmented; the rest get the plain "
                                                            "crop and flip")

    @field_validator("crop_scale")
    @classmethod
    def _scale_is_a_share(cls, scale: Optional[tuple[float, float]]) -> Optional[tuple[float, float]]:
        if scale is not None and not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError("must be [min, max] with 0 < min <= max <= 1 (shares of the image's area)")
        return scale

    @field_validator("crop_ratio")
    @classmethod
    def _ratio_is_a_range(cls, ratio: tuple[float, float]) -> tuple[float, float]:
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError("must be [min, max] with 0 < min <= max (aspect ratios, e.g. [0.75, 1.333])")
        return ratio

    @property
    def active(self) -> bool:
        return self.crop_scale is not None or any(
            (self.rotation, self.brightness, self.contrast, self.saturation, self.hue))

    @model_validator(mode="after")
    def _no_idle_settings(self) -> "AugmentConfig":
        # (against the defaults, not the keys given: a written config.yaml spells every default out)
        fields = type(self).model_fields
        if self.crop_scale is None and self.crop_ratio != fields["crop_ratio"].default:
            raise ValueError("data.augment.crop_ratio does nothing without data.augment.crop_scale; turn that on, "
                             "or remove it")
        if not self.active and self.probability != fields["probability"].default:
            raise ValueError("data.augment.probability does nothing without an augmentation turned on; turn one on, "
                             "or remove it")
        return self


def caption_suffix(value: str) -> str:
    """A caption file's extension with its dot ("caption" is ".caption", as kohya writes it with one); an empty
    or dotted-path one is refused (it found no captions, or crashed in Path.with_suffix)."""
    suffix = value if value.startswith(".") else f".{value}"
    if len(suffix) < 2 or suffix.endswith(".") or ".." in suffix or "/" in suffix or "\\" in suffix:
        raise ValueError(f"{value!r} is no file extension; give one such as .txt or .caption")
    return suffix


class DataConfig(Section):
    source: Literal["folder", "jsonl", "laion", "webdataset", "hf"] = "folder"
    path: str = Field(description="image folder, jsonl file, laion filelist, webdataset tar(s), or for hf: a "
                                  "save_to_disk folder, parquet file(s) or glob, or a Hub id")
    captions: Literal["auto", "metadata", "txt", "none"] = "auto"
    caption_extension: str = ".txt"

    @field_validator("caption_extension")
    @classmethod
    def _with_its_dot(cls, value: str) -> str:
        return caption_suffix(value)

    image_key: str = Field("image", description="jsonl: the key holding the image path")
    caption_key: str = Field("caption", description="jsonl: the key holding the caption (a string or a list)")
    image_column: str = Field("image", description="hf: the column holding the image (Image feature, bytes or a path)")
    caption_column: Optional[str] = Field(
        "caption", description="hf: the column holding the caption (a string or a list); null: no captions"
    )
    split: str = Field("train", description="hf: the split to read (of a saved DatasetDict or a Hub data set)")
    hf_config: Optional[str] = Field(None, description="hf: the Hub data set's configuration (subset) name")
    revision: Optional[str] = Field(None, description="hf: the Hub data set's branch, tag or commit")
    streaming: bool = Field(False, description="hf: stream parquet or Hub data instead of copying it (data larger "
                                               "than the disk); the first open reads it all once to index it")
    resolution: int = Field(32, ge=8, le=4096)
    crop: Literal["center", "random"] = "center"
    random_flip: bool = True
    num_workers: int = Field(0, ge=0, le=64)
    max_image_pixels: int = Field(
        64_000_000, ge=1, description="larger images are skipped as decompression bombs"
    )
    shard_mixing: int = Field(
        1, ge=1, description="shard sources: how many shards an epoch reads interleaved, so each batch mixes "
                             "them; every data process holds that many shards in memory"
    )
    buckets: BucketConfig = Field(default_factory=BucketConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def _resolution_fits_unet(self) -> "DataConfig":
        if self.resolution % 8:
            raise ValueError(f"data.resolution = {self.resolution}: must be a multiple of 8")
        if self.buckets.enabled and self.resolution % self.buckets.step:
            raise ValueError(
                f"data.buckets.step = {self.buckets.step}: must divide data.resolution = {self.resolution} "
                "(the square bucket is resolution x resolution)"
            )
        if self.streaming and self.source != "hf":
            raise ValueError(f"data.streaming = true applies to data.source = hf, not {self.source}")
        sharded = self.source in ("laion", "webdataset") or self.streaming
        if self.shard_mixing > 1 and not sharded:
            raise ValueError(
                f"data.shard_mixing = {self.shard_mixing} applies to shard sources (data.source = laion, webdataset, "
                f"or hf with streaming), not {self.source}: its records are shuffled across the whole data set already"
            )
        return self


UnetPreset = Literal[tuple(UNET_PRESETS)]


class ModelConfig(Section):
    # unconditional (pixel-space UNet2DModel)
    preset: Optional[UnetPreset] = "small"
    unet_config: Optional[str] = Field(None, description="a diffusers UNet2DModel config JSON; overrides preset")
    channels: int = Field(3, ge=1, le=4)
    # Class conditioning (unconditional method): a label per image, drawn with classifier-free guidance.
    classes: Union[Literal["captions"], list[str], None] = Field(
        None, description="'captions': one class per distinct caption; or the class names; none: unconditional")
    class_dropout: float = Field(0.1, ge=0, lt=1,
                                 description="share of labels trained as 'no class', which guidance needs")
    class_guidance: float = Field(3.0, ge=1, description="classifier-free guidance of previews, eval and sample")

    @field_validator("classes")
    @classmethod
    def _distinct_class_names(cls, classes: Union[str, list[str], None]) -> Union[str, list[str], None]:
        if not isinstance(classes, list):
            return classes
        names = [name.strip() for name in classes]
        if not names or not all(names) or len(set(names)) != len(names):
            raise ValueError("give distinct, non-empty class names (or 'captions')")
        return names
    # Stable Diffusion: a base model, and any component replaced one by one
    base: Optional[str] = Field(None, description="diffusers folder, hub id, or single-file .safetensors")
    unet: Optional[str] = Field(None, description="component folder, or a UNet2DConditionModel config .json (random init)")
    vae: Optional[str] = Field(None, description="component folder, or an AutoencoderKL config .json (method vae)")
    text_encoder: Optional[str] = None
    tokenizer: Optional[str] = None
    revision: Optional[str] = None
    variant: Optional[str] = None
    config: Optional[str] = Field(
        None, description="single-file base: the diffusers folder or hub id with its configs (default: diffusers' "
                          "guess from its keys, which takes every SD 2.x file for SD 2.1 768 v-prediction)")


class NoiseConfig(Section):
    # None: the base model's own value (text2image), or 1000 / linear / epsilon (unconditional).
    num_train_timesteps: Optional[int] = Field(None, ge=2, le=10_000)
    beta_schedule: Optional[Literal["linear", "scaled_linear", "cosine"]] = None
    prediction_type: Optional[Literal["epsilon", "v_prediction", "sample"]] = None
    snr_gamma: Optional[float] = Field(None, gt=0, description="min-SNR loss weighting; 5.0 is the paper's value")
    noise_offset: float = Field(0.0, ge=0, le=1)
    input_perturbation: float = Field(0.0, ge=0, le=1, description="extra noise on the input only (0.1 is usual)")
    zero_terminal_snr: bool = Field(False, description="rescale betas so the last step is pure noise; needs v_prediction")


class EmaConfig(Section):
    enabled: bool = True
    decay: float = Field(0.9999, gt=0, lt=1, description="the most the decay grows to")
    warmup: bool = Field(True, description="decay grows as 1-(1+step)^-power, so early weights are not frozen in")
    power: float = Field(0.75, gt=0, le=1)


class TrainingConfig(Section):
    max_steps: int = Field(1000, ge=1)
    batch_size: int = Field(32, ge=1, description="per process")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0, le=1)
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    lr_warmup_steps: int = Field(0, ge=0)
    lr_num_cycles: int = Field(1, ge=1, description="cosine_with_restarts: the number of hard restarts")
    lr_power: float = Field(1.0, gt=0, description="polynomial: the decay's power (1: linear)")
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_epsilon: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    mixed_precision: Literal["no", "fp16", "bf16", "auto"] = Field(
        "no",
        description="autocast dtype; auto = bf16 where the hardware computes it natively (CUDA GPUs with bf16, CPUs "
                    "with AVX512-BF16 or AMX), else no",
    )
    ema: EmaConfig = Field(default_factory=EmaConfig)
    optimizer: Literal["adamw", "adamw_8bit", "muon"] = Field(
        "adamw",
        description="adamw_8bit needs bitsandbytes; muon = Muon on the trained models' hidden weight matrices, AdamW "
                    "(these betas, eps, weight decay) on the rest, the same learning rate: for full training, not "
                    "LoRA or textual inversion",
    )
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, slower steps")

    @model_validator(mode="after")
    def _schedule_keys_act(self) -> "TrainingConfig":
        # diffusers' constant schedule takes no warm-up, and the cycles and power only their schedules: each was
        # accepted and did nothing
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise ValueError(f"training.lr_warmup_steps = {self.lr_warmup_steps}: lr_scheduler constant has no "
                             "warm-up; use constant_with_warmup")
        for key, value, default, schedule in (("lr_num_cycles", self.lr_num_cycles, 1, "cosine_with_restarts"),
                                              ("lr_power", self.lr_power, 1.0, "polynomial")):
            if value != default and self.lr_scheduler != schedule:
                raise ValueError(f"training.{key} = {value}: applies to lr_scheduler {schedule} only, and this "
                                 f"one is {self.lr_scheduler}")
        return self

    @model_validator(mode="after")
    def _packages_installed(self) -> "TrainingConfig":
        # Looked up, not imported: a missing package is said before the models load and a cache fills.
        import importlib.util

        for key, wanted, package, instead in (("optimizer", self.optimizer == "adamw_8bit", "bitsandbytes", "adamw"),
                                              ("attention", self.attention == "xformers", "xformers", "sdpa")):
            if wanted and importlib.util.find_spec(package) is None:
                raise ValueError(f"training.{key} = {getattr(self, key)} needs {package}, which is not installed "
                                 f"(pip install {package}, for CUDA); or set training.{key}: {instead}")
        return self

    @model_validator(mode="after")
    def _polynomial_has_room(self) -> "TrainingConfig":
        # diffusers' polynomial decay divides by the steps after warm-up and ends at lr 1e-7: past either, it
        # raised from inside the schedule (the first after the whole run had trained, with nothing saved).
        if self.lr_scheduler == "polynomial" and self.lr_warmup_steps >= self.max_steps:
            raise ValueError(f"training.lr_warmup_steps = {self.lr_warmup_steps}: lr_scheduler polynomial decays over "
                             f"the steps after warm-up; keep it below max_steps = {self.max_steps}")
        if self.lr_scheduler == "polynomial" and self.learning_rate <= 1e-7:
            raise ValueError(f"training.learning_rate = {self.learning_rate}: lr_scheduler polynomial decays to 1e-7; "
                             "use a higher rate or another lr_scheduler")
        return self
    attention: Literal["auto", "sdpa", "xformers", "default"] = Field(
        "auto",
        description="attention kernel: sdpa = torch's; default = diffusers' classic; auto = sdpa, but the classic kernel "
                    "for sequences of up to 256 tokens under bf16 on a CPU with bf16 arithmetic (AVX512-BF16, AMX), "
                    "where it is 1.2-2.6x faster",
    )
    allow_tf32: bool = Field(True, description="TF32 matmuls on Ampere+ GPUs")
    compile: Union[Literal["auto"], bool] = Field(
        "auto",
        description="torch.compile the trained modules; auto = on a CUDA GPU for runs of 1000+ steps; on a CPU "
                    "only for a whole SD UNet trained in bf16 at one size for 5000+ steps (x1.1-1.2 a step there; "
                    "fp32 and the demo's pixel UNet did not pay: benchmarks/text2image_step.py --compile, "
                    "demo_levers.py)",
    )
    compile_scope: Literal["model", "blocks"] = Field(
        "model",
        description="what training.compile compiles: model = each trained module whole; blocks = only the blocks a "
                    "diffusers model repeats (its _repeated_blocks: SD's transformer blocks), each shape compiled once "
                    "and reused, a module without such blocks whole. blocks compiles SD's UNet in a quarter of the time "
                    "(on 2 CPU cores: 60 s against 234 s cold) and leaves its ResNet blocks eager: x1.16 a step "
                    "there against model's x1.23",
    )
    keep_host_memory: Union[Literal["auto"], bool] = Field(
        "auto",
        description="keep the host memory a step frees for the next one (glibc malloc thresholds) instead of faulting "
                    "it back in every step; auto = when training on a CPU. The process keeps its peak resident size",
    )
    process_timeout_minutes: int = Field(
        30, ge=1,
        description="how long a process of a multi-process run waits at a barrier, for instance while rank 0 alone "
                    "evaluates or saves, before the launch is aborted (NCCL's own default is 10 minutes)",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _yaml_no(cls, value):
        # YAML 1.1 reads a bare `no` as false: `mixed_precision: no` means "no".
        return "no" if value is False else value


class Text2ImageConfig(Section):
    train_text_encoder: bool = False
    text_encoder_lr: Optional[float] = Field(None, gt=0, le=1, description="default: training.learning_rate")
    caption_dropout: float = Field(0.0, ge=0, le=1, description="share of captions replaced by '' (for CFG)")
    # kohya-ss's options for captions of comma-separated tags (booru style), under kohya's names
    shuffle_caption: bool = Field(False, description="shuffle a caption's comma-separated tags each time it is drawn")
    keep_tokens: int = Field(0, ge=0, description="the first N tags stay first, in place (a trigger word)")
    caption_tag_dropout_rate: float = Field(0.0, ge=0, lt=1,
                                            description="drop each tag after the kept ones with this probability")
    max_length: Optional[int] = Field(
        None, ge=2,
        description="text context in tokens; default the tokenizer's own. Saved with the model: generate uses it too",
    )


class LoraConfig(Section):
    """LoRA through peft: an adapter on text2image or dreambooth, not a method of its own."""

    enabled: bool = False
    rank: int = Field(4, ge=1, le=1024)
    alpha: Optional[float] = Field(None, gt=0, description="scale = alpha / rank; default alpha = rank")
    dropout: float = Field(0.0, ge=0, lt=1)
    # PiSSA/OLoRA rewrite the base weights to a residual, so the adapter alone would be wrong
    # applied to the original model in every other tool: not offered.
    init: Literal["default", "gaussian"] = Field(
        "default", description="peft init_lora_weights: default = Kaiming A, zero B (starts as the base model)"
    )
    unet_targets: list[str] = Field(
        default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"],
        description="module names in the UNet; add e.g. proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2",
    )
    text_encoder: bool = Field(False, description="also train a LoRA on the text encoder (lr: text2image.text_encoder_lr)")
    text_encoder_targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])


class DreamBoothConfig(Section):
    instance_prompt: Optional[str] = Field(None, description="caption of every instance image, e.g. 'a photo of sks dog'")
    prior_preservation: bool = True
    class_data: Optional[str] = Field(None, description="class image folder; missing images are generated into it")
    class_prompt: Optional[str] = Field(None, description="e.g. 'a photo of dog'")
    num_class_images: int = Field(100, ge=1)
    prior_loss_weight: float = Field(1.0, ge=0)
    class_steps: int = Field(25, ge=1, description="sampling steps per generated class image")
    class_guidance_scale: float = Field(7.5, ge=0)
    class_scheduler: str = "dpm++_2m"
    class_seed: int = Field(0, description="image i is generated from seed class_seed + i")
    class_batch_size: int = Field(4, ge=1, description="class images drawn per batch, in fixed groups (0-3, 4-7, ...)")


class TextualInversionConfig(Section):
    token: Optional[str] = Field(None, description="the new word, e.g. '<cat-toy>'")
    initializer: Optional[str] = Field(None, description="an existing one-token word the vectors start from, e.g. 'toy'")
    num_vectors: int = Field(1, ge=1, le=64)
    learnable_property: Literal["object", "style"] = "object"


class ValidationPair(Section):
    image: str = Field(description="a conditioning image (a mask, an edge map, or a photo for preprocess canny)")
    prompt: str


class ControlConfig(Section):
    """What ControlNet and T2I-Adapter runs share: where each record's condition comes from, how it
    is read, and what the previews draw."""

    conditioning_column: str = Field(
        "conditioning_image",
        description="metadata.jsonl / jsonl key naming each record's conditioning image file; hf: the column of them")
    conditioning_dir: Optional[str] = Field(
        None, description="instead: a folder holding each image's conditioning image under the image's relative name")
    preprocess: Literal["none", "mask", "segmentation", "canny", "depth", "pose", "lineart"] = Field(
        "none", description="what the model reads: the file as it is (none, mask, segmentation; masks are resized "
                            "nearest), or computed after the crop: canny, or depth/pose/lineart through controlnet_aux")
    canny_low_threshold: int = Field(100, ge=0, le=255)
    canny_high_threshold: int = Field(200, ge=0, le=255)
    annotator_path: Optional[str] = Field(None, description="depth/pose/lineart: a local folder with the annotator weights")
    conditioning_scale: float = Field(1.0, gt=0, le=4, description="the residuals' weight, in training and the "
                                                                   "validation pairs")
    proportion_empty_prompts: float = Field(0.0, ge=0, le=1, description="share of captions replaced by '' "
                                                                         "(diffusers' train_controlnet.py option)")
    validation: list[ValidationPair] = Field(
        default_factory=list, description="[{image, prompt}]: drawn at every sample step, with their agreement")


class ControlNetConfig(ControlConfig):
    model: Optional[str] = Field(
        None, description="a ControlNet to continue training (folder, hub id, .safetensors); default: made from the "
                          "base UNet (ControlNetModel.from_unet)")


class T2IAdapterConfig(ControlConfig):
    model: Optional[str] = Field(None, description="a T2I-Adapter to continue training (folder, hub id); default: new")
    adapter_type: Literal["full_adapter", "light_adapter"] = "full_adapter"
    num_res_blocks: int = Field(2, ge=1, le=8)


class VaeTrainConfig(Section):
    kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term against the L1+L2 reconstruction")


class OutputConfig(Section):
    single_file: bool = Field(False, description="also write model.safetensors in the A1111/ComfyUI layout")
    single_file_dtype: Literal["fp32", "fp16", "bf16"] = "fp16"
    trained_only: bool = Field(False, description="save only the trained components (e.g. the UNet alone for a UNet pretraining run)")


class CheckpointConfig(Section):
    every_steps: int = Field(500, ge=1)
    keep_last: int = Field(3, ge=1)
    keep_best: Optional[str] = Field(
        None, description="a metric of eval.metrics (fid, kid, is, precision, recall, clip_score, lpips_diversity), "
        "optionally with its direction (fid:min); keeps that checkpoint out of pruning and writes model-best/",
    )


class EvalConfig(Section):
    """Evaluation during training (off until every_steps is set); `difftrain eval` takes the same settings as flags."""

    every_steps: Optional[int] = Field(None, ge=1, description="evaluate every this many steps and at the end")
    metrics: list[Literal[METRICS]] = Field(default_factory=lambda: ["fid", "kid"])
    # 64 images at 15 DPM++ steps keep evaluation near 10 % of the demo's time on 2 CPU cores
    # (benchmarks/eval_cost.py); KID is unbiased at such counts, FID is not (compare it with itself).
    num_images: int = Field(64, ge=2, description="images drawn per evaluation (the same count every time)")
    images_per_prompt: int = Field(4, ge=1, description="text2image: seeds per prompt")
    prompts: list[str] = Field(default_factory=list, description="text2image: default a seeded sample of the captions")
    negative_prompt: str = Field("", description="text2image: as `difftrain eval --negative-prompt` (not "
                                                 "sample.negative_prompt, the previews')")
    reference: Optional[str] = Field(None, description="real images; default data.path (read as data.source)")
    reference_source: Optional[Literal["folder", "jsonl", "laion", "webdataset", "hf"]] = None
    reference_image_key: Optional[str] = Field(None, description="a jsonl reference's image key, an hf one's column")
    reference_caption_key: Optional[str] = Field(None, description="a jsonl reference's caption key, an hf one's "
                                                                    "column")
    reference_max: Optional[int] = Field(2000, ge=2, description="a seeded sample of the reference, for speed")
    scheduler: str = "dpm++_2m"
    steps: int = Field(15, ge=1, le=1000)
    guidance_scale: float = Field(7.5, ge=0)
    seed: int = 0
    batch_size: int = Field(32, ge=1, description="images per sampling batch")
    clip_model: Optional[str] = None
    weights_dir: Optional[str] = None
    inception_weights: Optional[str] = None
    alexnet_weights: Optional[str] = None
    lpips_weights: Optional[str] = None
    cache_dir: Optional[str] = Field(None, description="reference feature cache; default ~/.cache/difftrain/eval")

    @model_validator(mode="after")
    def _known_scheduler(self) -> "EvalConfig":
        return _check_scheduler(self, "eval.scheduler")


class SampleConfig(Section):
    every_steps: int = Field(500, ge=1)
    num_images: int = Field(16, ge=1, le=256)
    scheduler: str = "dpm++_2m"
    steps: int = Field(25, ge=1, le=1000)
    seed: int = 0
    prompts: list[str] = Field(default_factory=list, description="text2image: one image per prompt")
    negative_prompt: str = ""
    guidance_scale: float = Field(7.5, ge=0)

    @model_validator(mode="after")
    def _known_scheduler(self) -> "SampleConfig":
        return _check_scheduler(self, "sample.scheduler")


def _check_scheduler(section, key: str, name: str | None = None):
    from difftrain.sampling.schedulers import UnknownScheduler, resolve_name

    name = section.scheduler if name is None else name
    try:
        resolve_name(name)  # our short names and A1111's sampler names
    except UnknownScheduler as error:
        raise ValueError(f"{key} = {name!r}: {error}") from None
    return section


class LogConfig(Section):
    every_steps: int = Field(10, ge=1)
    tensorboard: bool = True


CONFIG_VERSION = 2  # 2: each method has only its own sections (1 held every method's, defaults and all)


class RunConfig(Section):
    """The sections every run has; each method's class below adds its own and its rules."""

    version: int = Field(CONFIG_VERSION, description="config schema version; older ones are migrated on load")
    output_dir: str = "runs/run"
    seed: int = Field(0, ge=0, lt=2**32, description="NumPy's seeds are 32-bit: no -1 (A1111's 'random') here")
    method: str
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    noise: NoiseConfig = Field(default_factory=NoiseConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    @classmethod
    def top_level_values(cls) -> tuple[str, ...]:
        """The top-level keys that hold a value, not a section."""
        return tuple(name for name, info in cls.model_fields.items()
                     if not (isinstance(info.annotation, type) and issubclass(info.annotation, Section)))

    @model_validator(mode="after")
    def _terminal_snr_needs_v(self) -> "RunConfig":
        # (A method that takes no noise settings refuses this one with its own reason, after this rule: its advice
        # would be refused in turn.)
        if (self.noise.zero_terminal_snr and self.noise.prediction_type != "v_prediction"
                and self.method not in NO_NOISE_SETTINGS):
            raise ValueError("noise.zero_terminal_snr = true: at zero SNR the noise cannot be predicted; "
                             "set noise.prediction_type: v_prediction")
        return self

    @model_validator(mode="after")
    def _keep_best_is_evaluated(self) -> "RunConfig":
        best = self.checkpoint.keep_best
        if best is None:
            return self
        name, _, direction = best.partition(":")
        if name not in RESULTS:
            raise ValueError(f"checkpoint.keep_best = {best!r}: not a metric; choose one of {', '.join(RESULTS)}")
        if direction not in ("", "min", "max"):
            raise ValueError(f"checkpoint.keep_best = {best!r}: the direction after ':' is min or max")
        if self.eval.every_steps is None:
            raise ValueError(f"checkpoint.keep_best = {best!r}: set eval.every_steps, so the metric is measured")
        if RESULTS[name][0] not in self.eval.metrics:
            raise ValueError(f"checkpoint.keep_best = {best!r}: add {RESULTS[name][0]} to eval.metrics")
        return self

    @model_validator(mode="after")
    def _classes_are_for_pixel_models(self) -> "RunConfig":
        if self.model.classes is not None and not isinstance(self, UnconditionalRun):
            raise ValueError(f"model.classes: class labels condition the unconditional method's pixel UNet; "
                             f"method {self.method} conditions on its captions' text instead: remove model.classes")
        model = self.model
        if model.classes is None:
            for key in ("class_dropout", "class_guidance"):
                if getattr(model, key) != ModelConfig.model_fields[key].default:
                    raise ValueError(f"model.{key}: it applies to class-conditional models; set model.classes "
                                     "(captions, or the class names) or remove it")
            return self
        if self.data.captions == "none":
            raise ValueError("model.classes: each image's caption names its class, and data.captions is none; "
                             "read the captions (data.captions: auto) or remove model.classes")
        if model.class_dropout == 0 and model.class_guidance != 1:
            raise ValueError(f"model.class_guidance = {model.class_guidance} with model.class_dropout = 0: guidance "
                             "steers away from the 'no class' prediction, which only dropped labels train; "
                             "set class_dropout (0.1 is usual) or class_guidance: 1")
        return self

    @model_validator(mode="after")
    def _model_keys_the_method_reads(self) -> "RunConfig":
        """A model key another kind of method reads was ignored without a word (model.base on a pixel run trained
        a fresh model, a VAE run's model.unet nothing)."""
        reads = {"unconditional": PIXEL_MODEL_KEYS, "vae": ("vae", "base", "revision", "variant", "config")}.get(
            self.method, SD_MODEL_KEYS)
        for key in (*PIXEL_MODEL_KEYS, *SD_MODEL_KEYS):
            given = getattr(self.model, key) != ModelConfig.model_fields[key].default
            if given and key not in reads and key != "classes":  # (classes: _classes_are_for_pixel_models)
                kinds = "the unconditional method's pixel UNet" if key in PIXEL_MODEL_KEYS else \
                    "Stable Diffusion methods (and model.vae, model.base: method vae)"
                raise ValueError(f"model.{key}: it is read by {kinds}; method {self.method} does not read it: "
                                 "remove it (or choose the method that reads it)")
        return self

    @model_validator(mode="after")
    def _muon_is_for_whole_models(self) -> "RunConfig":
        lora = getattr(self, "lora", None)
        if self.training.optimizer == "muon" and (self.method == "textual_inversion" or (lora and lora.enabled)):
            what = "textual inversion trains embedding vectors" if self.method == "textual_inversion" else \
                "a LoRA trains low-rank factors"
            raise ValueError(f"training.optimizer = muon is for a model's own weight matrices, and {what}: "
                             "set training.optimizer: adamw")
        return self

    @model_validator(mode="after")
    def _caching_is_for_latent_methods(self) -> "RunConfig":
        if not isinstance(self, LatentRun) and (self.data.cache.latents or self.data.cache.text):
            raise ValueError(f"data.cache: caching latents/text is for latent methods, not {self.method}")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# The model keys each kind of method reads (ModelConfig holds both kinds).
PIXEL_MODEL_KEYS = ("preset", "unet_config", "channels", "classes", "class_dropout", "class_guidance")
SD_MODEL_KEYS = ("base", "unet", "vae", "text_encoder", "tokenizer", "revision", "variant", "config")


class UnconditionalRun(RunConfig):
    method: Literal["unconditional"] = "unconditional"

    @model_validator(mode="after")
    def _no_prompts_to_score(self) -> "UnconditionalRun":
        if self.model.channels != 3:  # (it was accepted, then the first step failed deep inside torch)
            raise ValueError(f"model.channels = {self.model.channels}: images are read as RGB, 3 channels; "
                             "remove model.channels")
        if "clip" in self.eval.metrics:
            raise ValueError("eval.metrics: clip scores images against their prompts, and an unconditional model "
                             "draws without prompts; remove clip")
        if self.output.single_file:  # (it was ignored)
            raise ValueError("output.single_file with method unconditional: the single file is A1111's and ComfyUI's "
                             "Stable Diffusion checkpoint; a pixel model is written as a diffusers folder only")
        return self


class VaeRun(RunConfig):
    method: Literal["vae"] = "vae"
    vae: VaeTrainConfig = Field(default_factory=VaeTrainConfig)

    @model_validator(mode="after")
    def _vae_rules(self) -> "VaeRun":
        if self.data.buckets.enabled:
            raise ValueError("method vae: train the VAE on square crops (data.buckets.enabled: false)")
        if not (self.model.vae or self.model.base):
            raise ValueError("method vae: set model.vae (a folder to fine-tune, or a config .json) or model.base")
        if self.eval.every_steps is not None:
            raise ValueError("eval.every_steps with method vae: a VAE draws no images to evaluate")
        defaults = NoiseConfig()
        noise = [key for key, value in self.noise.model_dump().items() if value != getattr(defaults, key)]
        if noise:
            raise ValueError(f"noise.{noise[0]} with method vae: a VAE learns to reconstruct, with no noise schedule "
                             "or denoising loss; remove the noise section")
        if self.output.single_file:
            raise ValueError("output.single_file with method vae: the single file is A1111's and ComfyUI's Stable "
                             "Diffusion checkpoint; a VAE is written as a diffusers AutoencoderKL folder (a "
                             "StableDiffusionPipeline takes it as vae=)")
        return self


class LatentRun(RunConfig):
    """Stable Diffusion methods: a base model (or its parts), captions encoded by its text encoder."""

    text2image: Text2ImageConfig = Field(default_factory=Text2ImageConfig)

    @model_validator(mode="after")
    def _latent_rules(self) -> "LatentRun":
        model, data, method = self.model, self.data, self.method
        if not model.base and not (model.unet and model.vae and model.text_encoder):
            raise ValueError(
                f"method {method}: set model.base (a diffusers folder, hub id or .safetensors file), "
                "or all of model.unet, model.vae, model.text_encoder and model.tokenizer"
            )
        if not model.base and not model.tokenizer:
            raise ValueError(f"method {method}: without model.base, model.tokenizer must be set too")
        if model.vae and model.vae.lower().endswith(".json"):  # (it trained on a random VAE, kept frozen)
            raise ValueError(f"model.vae = {model.vae!r}: a config .json builds a VAE with random weights, and method "
                             f"{method} never trains its VAE; give a trained VAE's folder (method vae trains one)")
        if data.cache.latents and data.crop == "random":
            raise ValueError(
                "data.cache.latents = true with data.crop = random: a cached latent has one crop; "
                "set data.crop: center (random_flip is fine, both flips are cached)"
            )
        if data.cache.latents and data.augment.active:
            raise ValueError(
                "data.augment with data.cache.latents = true: a latent cache stores one view of each image (its "
                "centre crop, and its mirror image when data.random_flip is on), so every epoch would train on the "
                "same frozen view; turn data.cache.latents off to augment, or keep the cache, remove data.augment "
                "and rely on data.random_flip (both flips are cached, one is drawn per sample)"
            )
        return self

    @property
    def trains_text_encoder(self) -> bool:
        return self.text2image.train_text_encoder

    @model_validator(mode="after")
    def _caption_tag_rules(self) -> "LatentRun":
        t2i = self.text2image
        if (t2i.shuffle_caption or t2i.caption_tag_dropout_rate) and self.data.cache.text:
            raise ValueError("text2image.shuffle_caption / caption_tag_dropout_rate with data.cache.text: a cached "
                             "embedding is of one order of the tags; turn the text cache off to vary them")
        return self


class Text2ImageRun(LatentRun):
    method: Literal["text2image"] = "text2image"
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @property
    def trains_text_encoder(self) -> bool:
        return self.text2image.train_text_encoder or (self.lora.enabled and self.lora.text_encoder)

    @model_validator(mode="after")
    def _text_encoder_rules(self) -> "Text2ImageRun":
        lora = self.lora
        given = [f"lora.{key}" for key in sorted(lora.model_fields_set - {"enabled"})
                 if getattr(lora, key) != type(lora).model_fields[key].get_default(call_default_factory=True)]
        if given and "enabled" not in lora.model_fields_set:  # (enabled: false said outright turns a LoRA off)
            raise ValueError(f"{', '.join(given)} without lora.enabled: true: the run would fine-tune the whole "
                             "UNet instead; add lora.enabled: true, or remove the lora section")
        if self.text2image.text_encoder_lr is not None and not self.trains_text_encoder:
            raise ValueError("text2image.text_encoder_lr: nothing trains the text encoder (text2image."
                             "train_text_encoder, or lora.text_encoder with lora.enabled); remove the setting")
        if self.data.cache.text and self.trains_text_encoder:
            raise ValueError(
                "data.cache.text = true while the text encoder trains: the embeddings change "
                "as it trains; turn one of them off"
            )
        if self.lora.enabled and (self.output.single_file or self.output.trained_only):
            raise ValueError(
                "output.single_file / output.trained_only with lora.enabled: a LoRA run writes the adapter files; "
                "`difftrain lora merge` makes a full model from them"
            )
        if self.lora.enabled and self.text2image.train_text_encoder:
            # A LoRA run writes adapters: a fully trained text encoder would be lost at the save, and the LoRA,
            # trained beside it, would draw otherwise on the base model. (diffusers' LoRA scripts' flag of this
            # name means LoRA on the text encoder.)
            raise ValueError(
                "text2image.train_text_encoder with lora.enabled: a LoRA run saves adapters, so a fully trained "
                "text encoder would be lost; set lora.text_encoder: true (LoRA on the text encoder, what "
                "diffusers' --train_text_encoder means in its LoRA scripts) and train_text_encoder: false"
            )
        return self


class DreamBoothRun(Text2ImageRun):
    method: Literal["dreambooth"] = "dreambooth"
    dreambooth: DreamBoothConfig = Field(default_factory=DreamBoothConfig)

    @model_validator(mode="after")
    def _dreambooth_rules(self) -> "DreamBoothRun":
        db = self.dreambooth
        if not db.instance_prompt:
            raise ValueError("method dreambooth: set dreambooth.instance_prompt, e.g. 'a photo of sks dog'")
        if db.prior_preservation and not (db.class_data and db.class_prompt):
            raise ValueError(
                "dreambooth.prior_preservation: set dreambooth.class_data (a folder; missing images are "
                "generated) and dreambooth.class_prompt, or set prior_preservation: false"
            )
        if db.prior_preservation and self.data.buckets.enabled:
            raise ValueError("data.buckets with dreambooth.prior_preservation: class images are square; turn buckets off")
        if db.prior_preservation:
            _check_class_folder(db.class_data, self.data.path if self.data.source == "folder" else None)
        _check_scheduler(db, "dreambooth.class_scheduler", db.class_scheduler)
        return self


def _check_class_folder(class_data: str, instance_folder: str | None) -> None:
    """DreamBooth's class folder must be a folder it can make, apart from the instance images: class images
    written among them would train as instances (a folder source reads its subfolders too), and the
    instances read as the class prior."""
    folder = Path(class_data).expanduser()
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        where = "is a file" if existing == folder else f"is inside the file {existing}"
        raise ValueError(f"dreambooth.class_data = {class_data!r} {where}; it is the folder class images are read "
                         "from and generated into")
    if instance_folder is not None:
        classes, instances = folder.resolve(), Path(instance_folder).expanduser().resolve()
        if classes.is_relative_to(instances) or instances.is_relative_to(classes):
            raise ValueError(f"dreambooth.class_data = {class_data!r} and data.path = {instance_folder!r}: one holds "
                             "the other, so class images would train as instances (or instances as the class "
                             "prior); give the class images a folder of their own")


# Methods whose own rules refuse noise settings: a frozen UNet's (_frozen_unet_noise), and a VAE's, which has none.
NO_NOISE_SETTINGS = ("controlnet", "t2i_adapter", "textual_inversion", "vae")


def _frozen_unet_noise(run) -> None:
    """A method that leaves the UNet's weights as they are cannot change what it predicts: a noise schedule or
    target other than its base's would train against what it never gives, and be saved with the output."""
    noise = run.noise
    changed = [f"noise.{key}" for key in ("num_train_timesteps", "beta_schedule", "prediction_type")
               if getattr(noise, key) is not None] + (["noise.zero_terminal_snr"] if noise.zero_terminal_snr else [])
    if changed:
        raise ValueError(f"{', '.join(changed)} with method {run.method}: the UNet stays frozen and keeps predicting "
                         "what its base model was trained to; remove the setting (the base's own are used; a "
                         "single-file base of another kind takes model.config)")


class ControlRun(LatentRun):
    """A network beside the frozen UNet that reads a conditioning image: ControlNet, T2I-Adapter."""

    lora: LoraConfig = Field(default_factory=LoraConfig)  # optionally a LoRA on the frozen UNet, trained beside it

    @property
    def control(self) -> ControlConfig:
        return getattr(self, self.method)

    @model_validator(mode="after")
    def _control_rules(self) -> "ControlRun":
        method = self.method
        if self.text2image.caption_dropout:
            raise ValueError(f"text2image.caption_dropout with method {method}: set {method}.proportion_empty_prompts "
                             "(diffusers' name for it) instead")
        if self.text2image.train_text_encoder or self.lora.text_encoder:
            raise ValueError(f"method {method} trains its network (and optionally a LoRA on the UNet); the text "
                             "encoder stays frozen: turn text2image.train_text_encoder / lora.text_encoder off")
        if self.output.trained_only:
            raise ValueError(f"output.trained_only with method {method}: its own folder is all it writes")
        if self.eval.every_steps is not None:
            raise ValueError(f"eval.every_steps with method {method}: its measure is the agreement with the "
                             f"conditioning images of {method}.validation, taken at every sample.every_steps")
        control = self.control
        if control.canny_low_threshold > control.canny_high_threshold:
            raise ValueError(f"{method}.canny_low_threshold = {control.canny_low_threshold}: must not exceed "
                             f"canny_high_threshold = {control.canny_high_threshold}")
        _frozen_unet_noise(self)
        return self  # (validation images are checked when the run starts: resume may run where they moved)


class ControlNetRun(ControlRun):
    method: Literal["controlnet"] = "controlnet"
    controlnet: ControlNetConfig = Field(default_factory=ControlNetConfig)


class T2IAdapterRun(ControlRun):
    method: Literal["t2i_adapter"] = "t2i_adapter"
    t2i_adapter: T2IAdapterConfig = Field(default_factory=T2IAdapterConfig)

    @model_validator(mode="after")
    def _adapter_rules(self) -> "T2IAdapterRun":
        if self.output.single_file:
            raise ValueError("output.single_file with method t2i_adapter: a T2I-Adapter is written as a diffusers "
                             "folder only; turn output.single_file off")
        return self


class TextualInversionRun(LatentRun):
    method: Literal["textual_inversion"] = "textual_inversion"
    textual_inversion: TextualInversionConfig = Field(default_factory=TextualInversionConfig)

    @property
    def trains_text_encoder(self) -> bool:
        return True  # the new token's vectors live in it

    @model_validator(mode="after")
    def _textual_inversion_rules(self) -> "TextualInversionRun":
        ti = self.textual_inversion
        if not (ti.token and ti.initializer):
            raise ValueError("method textual_inversion: set textual_inversion.token and textual_inversion.initializer")
        if self.data.cache.text:
            raise ValueError("data.cache.text with textual_inversion: the new token's embedding changes as it trains")
        # Settings that would do nothing here: said, not silently ignored.
        idle = [key for key, value in (("text2image.train_text_encoder", self.text2image.train_text_encoder),
                                       ("text2image.text_encoder_lr", self.text2image.text_encoder_lr),
                                       ("text2image.shuffle_caption", self.text2image.shuffle_caption),
                                       ("text2image.caption_tag_dropout_rate",
                                        self.text2image.caption_tag_dropout_rate),
                                       ("output.single_file", self.output.single_file),
                                       ("output.trained_only", self.output.trained_only)) if value]
        if idle:
            raise ValueError(f"{', '.join(idle)} with textual_inversion: it trains the new token's vectors alone "
                             "(at training.learning_rate) and writes them as embedding files; remove the setting")
        _frozen_unet_noise(self)
        return self


# method name -> its config class: a new method adds its class here.
METHOD_CONFIGS: dict[str, type[RunConfig]] = {
    "unconditional": UnconditionalRun,
    "text2image": Text2ImageRun,
    "dreambooth": DreamBoothRun,
    "textual_inversion": TextualInversionRun,
    "vae": VaeRun,
    "controlnet": ControlNetRun,
    "t2i_adapter": T2IAdapterRun,
}
AnyRunConfig = Annotated[Union[tuple(METHOD_CONFIGS.values())], Field(discriminator="method")]
_ANY_RUN = TypeAdapter(AnyRunConfig)
COMMON_SECTIONS = set(RunConfig.model_fields)


LATENT_METHODS = tuple(name for name, cls in METHOD_CONFIGS.items() if issubclass(cls, LatentRun))

# Keys that may change between a checkpoint and its resume: they do not alter what the
# next optimizer step computes. Everything else must match, or resume would silently
# continue a different run.
RESUME_SAFE_KEYS = (
    "version",
    "output_dir",
    "training.max_steps",
    "training.learning_rate",  # after a divergence: the trainer rescales the restored rates and schedule
    "training.max_grad_norm",  # clipping from here on; nothing restored depends on it
    "training.keep_host_memory",  # where freed memory goes, not what is computed
    "training.process_timeout_minutes",
    "checkpoint.",
    "sample.",
    "eval.",  # evaluation draws with its own generators: it never changes the weights
    "controlnet.validation",  # what previews draw, likewise
    "t2i_adapter.validation",
    "log.",
    "data.num_workers",
    "data.path",
    "model.class_guidance",  # what previews and the manifest sample with
    "data.cache.",
    "output.",
)


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_conflicts(saved: RunConfig, current: RunConfig, compiled: bool = True) -> list[str]:
    """The settings that differ between a checkpoint's run and this one in a way that matters.

    `compiled`: whether either run compiles; if neither does, the compile scope decides nothing.
    """
    old, new = flatten(saved.model_dump(mode="json")), flatten(current.model_dump(mode="json"))
    conflicts = []
    for key in sorted(set(old) | set(new)):
        if any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE_KEYS):
            continue
        if key == "training.mixed_precision" and "auto" in (old.get(key), new.get(key)):
            continue  # a resumed `auto` keeps the checkpoint's precision; an explicit new value is the user's call
        if key == "training.compile_scope" and not compiled:
            continue
        if key == "training.attention" and {old.get(key), new.get(key)} == {"sdpa", "auto"}:
            continue  # checkpoints from before `auto` recorded the old default, sdpa: the kernel changes rounding only
        if old.get(key) != new.get(key):
            conflicts.append(f"{key}: checkpoint has {old.get(key)!r}, this config has {new.get(key)!r}")
    return conflicts


def _section_in(annotation: Any) -> type[BaseModel] | None:
    """The config class an annotation holds: itself, or inside a list or Optional (controlnet.validation's items)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next(filter(None, map(_section_in, typing.get_args(annotation))), None)


def _describe(error: dict[str, Any], model: type[BaseModel]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        parent = model
        for part in error["loc"][:-1]:
            if isinstance(part, int) or str(part) not in parent.model_fields:  # an item of a list, a union's branch
                continue
            parent = _section_in(parent.model_fields[str(part)].annotation) or parent
        allowed = list(parent.model_fields)
        key = str(error["loc"][-1])
        owners = [name for name, cls in METHOD_CONFIGS.items() if key in cls.model_fields]
        if parent is model and owners:
            return (f"section '{key}' belongs to method {' / '.join(owners)}, and this run's method is "
                    f"{model.model_fields['method'].default}: remove it, or set method: {owners[0]}")
        guess = difflib.get_close_matches(key, allowed, n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        return f"unknown key '{location}'{hint}; allowed here: {', '.join(allowed)}"
    if error["type"] == "missing":
        return f"missing key '{location}': it has no default and must be set"
    message = error["msg"].removeprefix("Value error, ")
    if not location or message.startswith((f"{location} =", f"{location}.")):  # a rule across keys names them itself
        return message
    return f"{location} = {error.get('input')!r}: {message}"


def parse_config(raw: dict[str, Any], source: str = "config") -> RunConfig:
    """A validated config of the method's own class; a config of an older version is migrated first."""
    raw = _sections(raw, source)
    raw = migrate(raw, source)
    method = raw.get("method")
    if method not in METHOD_CONFIGS:
        guess = difflib.get_close_matches(str(method), METHOD_CONFIGS, n=1)
        hint = f" (did you mean {guess[0]!r}?)" if guess else ""
        raise ConfigError(
            f"{source}: method = {method!r} is not a method{hint}; choose one of {', '.join(METHOD_CONFIGS)}"
        )
    try:
        return _ANY_RUN.validate_python(raw)
    except ValidationError as exc:
        cls = METHOD_CONFIGS[method]
        lines = [_describe({**error, "loc": error["loc"][1:]}, cls) for error in exc.errors()]
        raise ConfigError(f"{source}: invalid config\n  " + "\n  ".join(lines)) from None


def migrate(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """`raw` brought to CONFIG_VERSION, one version at a time; a newer version than ours is refused."""
    raw = dict(raw)
    raw.setdefault("method", "unconditional")
    version = raw.get("version", 1)  # configs before versions were version 1
    if not isinstance(version, int) or version < 1:
        raise ConfigError(f"{source}: version = {version!r}: config versions are whole numbers from 1")
    if version > CONFIG_VERSION:
        raise ConfigError(
            f"{source}: config version {version} was written by a newer difftrain; this one reads versions 1 to "
            f"{CONFIG_VERSION}. Upgrade difftrain, or write the config for version {CONFIG_VERSION}"
        )
    while version < CONFIG_VERSION:
        raw = MIGRATIONS[version](raw)
        version += 1
        raw["version"] = version
    return raw


def _drop_other_methods_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """1 -> 2: version 1 wrote every method's section into every run's config, at their defaults.

    A section of another method that still holds its defaults said nothing and is dropped;
    one with settings in it (ignored by version 1) is kept, so validation names it.
    """
    own = set(METHOD_CONFIGS[raw["method"]].model_fields) if raw["method"] in METHOD_CONFIGS else set()
    for name, section in SECTIONS_OF_SOME_METHOD.items():
        if name in raw and name not in own:
            try:
                unchanged = raw[name] is None or section.model_validate(raw[name]) == section()
            except ValidationError:
                unchanged = False
            if unchanged:
                del raw[name]
    return raw


SECTIONS_OF_SOME_METHOD: dict[str, type[Section]] = {
    name: field.annotation
    for cls in METHOD_CONFIGS.values()
    for name, field in cls.model_fields.items()
    if name not in COMMON_SECTIONS
}
MIGRATIONS = {1: _drop_other_methods_defaults}


def _sections(raw: Any, source: str) -> dict[str, Any]:
    """The top level of a config: a mapping, in which a section left empty (every key commented out: YAML's null)
    takes its defaults."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(raw).__name__}")
    # (A value left empty is refused, as inside a section: `output_dir: $UNSET` trained into runs/run.)
    return {key: value for key, value in raw.items() if value is not None or key in RunConfig.top_level_values()}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings; values are parsed as YAML (so `1e-4`, `true`, `[1, 2]` work)."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:  # (a section left empty is null in YAML)
                node[part] = {}
            child = node[part]
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: '{part}' is a value, not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            problem = str(getattr(exc, "problem", None) or exc).splitlines()[0]
            quoted = f"{key}='{value.replace(chr(39), chr(39) * 2)}'"  # (YAML's single quotes: '' is one ')
            shell = shlex.quote(quoted) if any(c in value for c in '"$`\\!') else f'"{quoted}"'
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                              f"--set {shell}") from None
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (the last one won, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"the key {key!r} is given twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def says(path: Path, config: RunConfig) -> bool:
    """Whether the config file `path` already says `config` (its comments and layout aside): the trainer leaves a
    run folder's config.yaml that a user wrote, and trains with, as written."""
    try:
        return load_config(path).model_dump() == config.model_dump()
    except (ConfigError, OSError):
        return False


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}" + (" (a folder: give the .yaml inside it)"
                                                               if path.is_dir() else ""))
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is YAML in UTF-8)") from None
    return parse_config(apply_overrides(_sections(raw, str(path)), overrides or []), source=str(path))
