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

if __name__ == "__main__":
    if os.environ.get("RANK") == "1":
        step_done, steps = trainer._LoopTimer.step_done, []

        def signalled_at_step_2(timer) -> None:
            steps.append(len(steps) + 1)
            if steps[-1] == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            step_done(timer)

        trainer._LoopTimer.step_done = signalled_at_step_2
    raise SystemExit(main(sys.argv[1:]))
