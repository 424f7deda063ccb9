"""`difftrain train ...` as on two machines whose run folders differ: rank 1 sees no checkpoint.

Launched under `accelerate launch` by tests/test_sharded_training.py: both processes must stop
with an error (rank 1's own, rank 0's naming the unshared folder) instead of one waiting forever
for the other at the next collective.
"""

from __future__ import annotations

import os
import sys

from difftrain.cli import main
from difftrain.training.checkpoint import CheckpointStore

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        CheckpointStore.latest = lambda self: None
    raise SystemExit(main(sys.argv[1:]))
