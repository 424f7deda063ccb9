"""`difftrain train ...` with rank 1 listing DreamBooth's class folder 3 s late, as a slow shared file system would.

Launched under `accelerate launch` by tests/test_personalise.py: rank 0 must not draw into the folder before
rank 1 has listed it, or the two plan different lists of batches and leave some undrawn.
"""

from __future__ import annotations

import os
import sys
import time

import difftrain.methods.dreambooth as dreambooth
from difftrain.cli import main

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        listing = dreambooth.folder_images
        dreambooth.folder_images = lambda folder: (time.sleep(3), listing(folder))[1]
    raise SystemExit(main(sys.argv[1:]))
