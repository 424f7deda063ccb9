"""Training methods, by the name used in `method:` of a run config."""

from __future__ import annotations

from difftrain.config import RunConfig
from difftrain.methods.base import Method
from difftrain.methods.unconditional import Unconditional

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Unconditional,)}


def build_method(config: RunConfig) -> Method:
    return METHODS[config.method](config)
