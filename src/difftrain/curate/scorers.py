"""The models curation runs: the LAION aesthetic predictor and an image-to-text captioner.

CLIP itself is evaluate.clip_score's ClipScorer (one loader for `eval` and `curate`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

from difftrain.curate.items import CurateError


class AestheticPredictor:
    """LAION's aesthetic predictor: a linear stack over unit-length CLIP image embeddings.

    Reads both releases by their state-dict layout: v1 (`sa_0_4_vit_l_14_linear.pth`, one
    Linear(768, 1): keys weight/bias) and v2 "improved aesthetic predictor"
    (`sac+logos+ava1-l14-linearMSE.pth`: Linear 768-1024-128-64-16-1 under `layers.{0,2,4,6,7}`,
    Dropout between them and no activation, exactly as trained, so none is added here).
    Both were trained on CLIP ViT-L/14 (openai/clip-vit-large-patch14) embeddings: another
    CLIP gives numbers without meaning even when its width happens to match.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        state = _load_state(self.path)
        layers = []
        for prefix in _linear_prefixes(state, self.path):
            weight, bias = state[f"{prefix}weight"], state.get(f"{prefix}bias")
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
            layer.weight.data.copy_(weight)
            if bias is not None:
                layer.bias.data.copy_(bias)
            layers.append(layer)
        for before, after in zip(layers, layers[1:]):
            if before.out_features != after.in_features:
                raise CurateError(f"aesthetic predictor {self.path}: its layers do not chain "
                                  f"({before.out_features} outputs into {after.in_features} inputs)")
        if layers[-1].out_features != 1:
            raise CurateError(f"aesthetic predictor {self.path}: ends in {layers[-1].out_features} outputs, not one score")
        self.model = torch.nn.Sequential(*layers).eval()
        self.input_size = layers[0].in_features

    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor) -> torch.Tensor:
        if embeddings.shape[-1] != self.input_size:
            raise CurateError(f"aesthetic predictor {self.path} takes {self.input_size}-wide CLIP embeddings, the CLIP "
                              f"given makes {embeddings.shape[-1]}: use the CLIP it was trained on "
                              "(openai/clip-vit-large-patch14 for LAION's)")
        unit = torch.nn.functional.normalize(embeddings.float(), dim=-1)
        return self.model(unit).squeeze(-1)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CurateError(f"aesthetic predictor weights {path}: no such file (LAION's is sac+logos+ava1-l14-linearMSE.pth "
                          "from github.com/christophschuhmann/improved-aesthetic-predictor)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        # weights_only: tensors and plain containers only, so a hostile .pth cannot run code
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a broken or hostile file: say which and why, not a deep traceback
        raise CurateError(f"aesthetic predictor {path}: cannot read it ({str(error).splitlines()[0]})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CurateError(f"aesthetic predictor {path}: not a state dict of tensors")
    return state


def _linear_prefixes(state: dict[str, torch.Tensor], path: Path) -> list[str]:
    """The key prefixes of the Linear layers in order: "" (v1), "layers.0." ... (v2)."""
    weights = [k[: -len("weight")] for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if not weights:
        raise CurateError(f"aesthetic predictor {path}: holds no linear layer weights (keys: {', '.join(list(state)[:6])})")

    def order(prefix: str) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", prefix)]

    return sorted(weights, key=order)


class Captioner:
    """Any image-to-text model transformers' AutoModelForImageTextToText loads (BLIP, BLIP-2, GIT,
    Florence-2, ...), from a local folder or a hub id; greedy decoding, so a caption is a pure
    function of (model, image, prompt) and can be cached."""

    def __init__(self, model: str | Path, device: str = "cpu", batch_size: int = 16, prompt: str | None = None,
                 max_new_tokens: int = 40):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from difftrain.evaluate.weights import hub_models_offline

        cached_only = not Path(model).is_dir() and hub_models_offline()  # (a folder needs no Hub)
        try:
            self.processor = AutoProcessor.from_pretrained(str(model), local_files_only=cached_only)
            self.model = AutoModelForImageTextToText.from_pretrained(str(model), local_files_only=cached_only)
            self.model = self.model.to(device).eval()
        except (OSError, ValueError, KeyError) as error:
            hint = (" This machine is offline: download it once elsewhere (huggingface-cli download "
                    f"{model}), or give a local folder." if cached_only else "")
            raise CurateError(f"captioning model {model}: cannot load it ({str(error).splitlines()[0]}).{hint}") from None
        self.device, self.batch_size = device, batch_size
        self.prompt, self.max_new_tokens = prompt, max_new_tokens

    def _room(self, inputs) -> int:
        """max_new_tokens, less what would run past the text decoder's position table: a model that never
        writes its end token (a small or young one) would otherwise fail with an index error in its
        embedding instead of giving its longest caption."""
        positions = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        if positions is None:
            return self.max_new_tokens
        prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1  # else the start token alone
        return max(1, min(self.max_new_tokens, positions - prompt))

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> list[str]:
        captions = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            extra = {"text": [self.prompt] * len(batch)} if self.prompt else {}
            inputs = self.processor(images=batch, return_tensors="pt", **extra).to(self.device)
            tokens = self.model.generate(**inputs, max_new_tokens=self._room(inputs), do_sample=False, num_beams=1)
            prompt = inputs.get("input_ids")
            if prompt is not None and tokens.shape[1] > prompt.shape[1] and torch.equal(
                    tokens[:, :prompt.shape[1]], prompt.to(tokens.device)):
                tokens = tokens[:, prompt.shape[1]:]  # a decoder-only model (LLaVA, Qwen2-VL) repeats its prompt first
            captions += [" ".join(text.split()) for text in self.processor.batch_decode(tokens, skip_special_tokens=True)]
        return captions
