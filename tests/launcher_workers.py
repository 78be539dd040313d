"""Importable rank functions for tests/test_launcher.py (spawned ranks import them by name)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hybridpar.distributed.launcher import current_device


def _record_pid(pid_dir: str | None) -> None:
    if pid_dir is not None:
        Path(pid_dir, f"rank{dist.get_rank()}.pid").write_text(str(os.getpid()))


def sum_of_ranks() -> dict:
    """All-reduce the rank; also report what the launcher set up in this rank."""
    x = torch.tensor([float(dist.get_rank())], device=current_device())
    dist.all_reduce(x)
    return {
        "rank": dist.get_rank(),
        "world": dist.get_world_size(),
        "sum": x.item(),
        "backend": dist.get_backend(),
        "device": str(x.device),
        "env": {k: os.environ[k] for k in ("MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK")},
        "threads": torch.get_num_threads(),
    }


def raise_on(bad_rank: int, pid_dir: str | None = None) -> None:
    """``bad_rank`` raises; the others wait in a collective that can never complete."""
    _record_pid(pid_dir)
    dist.barrier()
    if dist.get_rank() == bad_rank:
        raise ValueError(f"deliberate failure on rank {bad_rank}")
    dist.all_reduce(torch.ones(1, device=current_device()))


def exit_on(bad_rank: int, code: int, pid_dir: str | None = None) -> None:
    """``bad_rank`` dies without reporting (``os._exit``); the others block in an all-reduce."""
    _record_pid(pid_dir)
    dist.barrier()
    if dist.get_rank() == bad_rank:
        os._exit(code)
    dist.all_reduce(torch.ones(1, device=current_device()))


def hang_on(bad_rank: int, pid_dir: str | None = None) -> None:
    """``bad_rank`` sleeps forever; the others wait in a barrier it never joins."""
    _record_pid(pid_dir)
    if dist.get_rank() == bad_rank:
        time.sleep(3600)
    dist.barrier()


def unpicklable_result() -> object:
    return lambda: None


def print_and_return(text: str) -> str:
    print(text, flush=True)
    os.write(2, text.encode())
    return text
