"""Engine workers with an injected fault, for tests/test_engine.py (importable by spawned ranks)."""
from __future__ import annotations

import os
import signal
from typing import Any

from hybridpar.engine.config import EngineConfig
from hybridpar.engine.worker import EngineWorker


class InjectedFault(RuntimeError):
    pass


class FaultyWorker(EngineWorker):
    """Raises ``InjectedFault`` on global rank ``rank`` at the ``after``-th call of ``stage``:

    * ``"schedule"``: the leader deciding a step (``_get_next_batch``), a follower receiving one (``sync.receive``);
    * ``"forward"``: ``compute_logits``, after the step's plan has gone out (peers are inside the forward);
    * ``"sample"``: the leader processing sampled tokens (``_process_batch_result``);
    * ``"kill"``: the rank SIGKILLs itself in the forward (a crash without a traceback).
    """

    def __init__(self, config: EngineConfig, rank: int, stage: str, after: int = 3) -> None:
        super().__init__(config)
        if int(os.environ["RANK"]) != rank:
            return
        sched = self.scheduler
        assert sched is not None
        target, name = {
            "schedule": (sched, "_get_next_batch") if sched.is_leader else (sched.sync, "receive"),
            "forward": (sched.model, "compute_logits"),
            "kill": (sched.model, "compute_logits"),
            "sample": (sched, "_process_batch_result"),
        }[stage]
        original = getattr(target, name)
        calls = [0]

        def faulty(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] == after:
                if stage == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise InjectedFault(f"injected in {stage} on rank {rank}")
            return original(*args, **kwargs)

        setattr(target, name, faulty)
