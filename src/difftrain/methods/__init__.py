"""Training methods, by the name used in `method:` of a run config."""

from __future__ import annotations

import importlib

from difftrain.config import RunConfig
from difftrain.methods.base import Method

# Imported on demand: text2image pulls in transformers, which the unconditional method never needs.
METHODS: dict[str, str] = {
    "unconditional": "difftrain.methods.unconditional:Unconditional",
    "text2image": "difftrain.methods.text2image:TextToImage",
    "dreambooth": "difftrain.methods.dreambooth:DreamBooth",
    "textual_inversion": "difftrain.methods.textual_inversion:TextualInversion",
    "vae": "difftrain.methods.vae:VaeTraining",
    "controlnet": "difftrain.methods.controlnet:ControlNetTraining",
    "t2i_adapter": "difftrain.methods.t2i_adapter:T2IAdapterTraining",
}


def method_class(config: RunConfig) -> type[Method]:
    module, name = METHODS[config.method].split(":")
    return getattr(importlib.import_module(module), name)


def build_method(config: RunConfig) -> Method:
    return method_class(config)(config)
