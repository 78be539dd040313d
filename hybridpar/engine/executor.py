"""Where an engine's ranks live: spawned here (``"mp"``), started by torchrun (``"torchrun"``) or by Ray (``"ray"``).

Every executor offers what :class:`~hybridpar.engine.llm.LLM` needs: ``call(method, ...)`` runs the
method on every rank's :class:`~hybridpar.engine.worker.EngineWorker` and returns the values in
rank order, ``pids`` and ``close()``.

* ``"mp"`` is :class:`~hybridpar.distributed.rank_pool.RankPool`: this process is the parent, the
  ranks are its children, and it alone calls ``generate``.
* ``"torchrun"`` (alias ``"external_launcher"``, vLLM's name) is :class:`ExternalLauncherExecutor`:
  this process *is* one rank of a ``torchrun`` job (env:// rendezvous), on one node or several
  (``--nnodes``); it picks its GPU from ``LOCAL_RANK``. Every rank builds the same ``LLM`` and makes
  the same calls (SPMD); each holds one worker, and the values are all-gathered so that every rank
  sees every replica's results.
* ``"ray"`` is :class:`~hybridpar.engine.ray_executor.RayExecutor`: one Ray actor per rank, placed
  on a Ray cluster's nodes by a placement group; this process is the driver, as with ``"mp"``.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist

from hybridpar.config import EXECUTOR_BACKENDS
from hybridpar.distributed.launcher import is_torchrun, setup_rank, teardown_rank
from hybridpar.distributed.rank_pool import RankPool



class ExternalLauncherExecutor:
    """This process is one torchrun rank: set up the process group, hold one worker, call it in step."""

    def __init__(self, factory: Callable[..., Any], config: Any, backend: str = "auto") -> None:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        gpus_for_all = torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if backend == "auto":
            backend = "nccl" if gpus_for_all else "gloo"
        setup_rank(backend, rank, world, local_rank, "env://", None)
        self.worker = factory(config)
        self.pids = [os.getpid()]

    def call(self, method: str, *args: Any, on_progress: Any = None, timeout: float | None = None,
             **kwargs: Any) -> list[Any]:
        value = getattr(self.worker, method)(*args, **kwargs)
        values: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(values, value)
        return values

    def close(self) -> None:
        if dist.is_initialized():
            teardown_rank()


def make_executor(kind: str, factory: Callable[..., Any], config: Any, backend: str, start_timeout: float,
                  ray_placement: str = "pack") -> Any:
    """The executor ``kind`` for ``config``'s world, after checking that it can run here."""
    if kind not in EXECUTOR_BACKENDS:
        raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, got {kind!r}")
    if kind == "mp":
        return RankPool(factory, config.world_size, config, backend=backend, start_timeout=start_timeout)
    if kind == "ray":
        from hybridpar.engine.ray_executor import RayExecutor, check_ray_available

        check_ray_available()
        return RayExecutor(factory, config, backend, ray_placement, start_timeout)
    if not is_torchrun():
        raise ValueError(f"distributed_executor_backend={kind!r} runs inside torchrun (one rank per process); "
                         "outside it use 'mp', which spawns the ranks, or 'ray'")
    config.parallel.check_world_size(int(os.environ["WORLD_SIZE"]))
    return ExternalLauncherExecutor(factory, config, backend)
