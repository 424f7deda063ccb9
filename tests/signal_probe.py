"""`difftrain train ...` whose rank-1 process alone gets SIGTERM, during its second step: as when a user
`kill`s one process, or a scheduler's signal reaches the processes at different steps.

Launched under `accelerate launch` by tests/test_sharded_training.py: both processes must stop together
at the step after (3), with a checkpoint there, which resumes exactly.
"""

from __future__ import annotations

import os
import signal
import sys

from difftrain.cli import main
from difftrain.training import trainer

def signalling_step_done(step: int, signum: int = signal.SIGTERM):
    """The trainer's `_LoopTimer.step_done`, sending this process `signum` as its `step`-th step ends."""
    step_done, done = trainer._LoopTimer.step_done, []

    def signalling(timer) -> None:
        done.append(timer)
        if len(done) == step:
            os.kill(os.getpid(), signum)
        step_done(timer)

    return signalling


if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        trainer._LoopTimer.step_done = signalling_step_done(2)
    raise SystemExit(main(sys.argv[1:]))
