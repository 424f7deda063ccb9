"""difftrain's cache folder on this machine: evaluation's reference features, curation's model
outputs and torch.compile's kernels, each in its own subfolder."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """difftrain's own cache: $DIFFTRAIN_CACHE, else $XDG_CACHE_HOME/difftrain, else ~/.cache/difftrain."""
    if os.environ.get("DIFFTRAIN_CACHE"):
        return Path(os.environ["DIFFTRAIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "difftrain"


def use_compile_cache() -> Path:
    """Where inductor keeps compiled kernels: difftrain's cache, unless TORCHINDUCTOR_CACHE_DIR names another.

    Inductor's own default is /tmp/torchinductor_USER, which many machines empty at reboot; a
    second run that finds its kernels skips most of the compile (tiny SD's UNet on 2 CPU cores:
    47 s the first time, 11 s after). Importing diffusers already writes inductor's default into
    the environment, so a value equal to that default counts as unset.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_root() / "torch-compile")
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
