"""difftrain's cache folder on this machine: evaluation's reference features, curation's model
outputs and torch.compile's kernels, each in its own subfolder."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

# The user's own choice, read when difftrain is imported: importing diffusers later writes inductor's
# default (/tmp/torchinductor_USER) into the environment, which is not a choice.
_INDUCTOR_DIR_GIVEN = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or None


def cache_root() -> Path:
    """difftrain's own cache: $DIFFTRAIN_CACHE, else $XDG_CACHE_HOME/difftrain, else ~/.cache/difftrain."""
    if os.environ.get("DIFFTRAIN_CACHE"):
        return Path(os.environ["DIFFTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "difftrain"


def prepare_compile() -> Path:
    """What every torch.compile in difftrain (training and `generate --compile`) sets up first;
    returns where inductor keeps compiled kernels: difftrain's cache, unless TORCHINDUCTOR_CACHE_DIR was set.

    Inductor's own default is /tmp/torchinductor_USER, which many machines empty at reboot; a
    second run that finds its kernels skips most of the compile (`generate --compile` reports
    both). Inductor reads the variable on every use, so setting it before compiling is enough.
    """
    # diffusers' up- and downsampling ask is_torch_version (an lru_cache) on every call; dynamo traces
    # through the cache and says so in a long warning each compile would print for nothing: the answer
    # is a constant.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`-wrapped function")
    folder = _INDUCTOR_DIR_GIVEN or str(cache_root() / "torch-compile")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return Path(folder)
