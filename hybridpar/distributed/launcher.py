"""Start N ranks of a function on one machine, from a notebook cell or a script.

``launch(fn, nprocs, *args)`` runs ``fn(*args, **kwargs)`` in ``nprocs`` fresh processes that
form one ``torch.distributed`` world, and returns the values in rank order.

Design
------
* **spawn, not fork.** Each rank is a new interpreter (``torch.multiprocessing`` "spawn"
  context). Forking a process that already holds CUDA state, OpenMP pools or a Jupyter kernel's
  threads is unsafe; spawning is safe everywhere. The price: ``fn`` travels by *reference*
  (module + name), so it must live in an importable module. This is checked before spawning.
* **One pipe per rank, watched together with the process sentinels.** A rank sends exactly one
  message, ``("ok", rank, value, t)`` or ``("err", rank, traceback_text, t)``, pickled by the rank
  itself so that an unpicklable result becomes an error report instead of a silent loss (a
  ``multiprocessing.Queue`` pickles in a background thread and only prints such errors). The
  parent blocks in ``multiprocessing.connection.wait`` on all pipes *and* all process sentinels,
  so it wakes the moment a rank reports or dies (``os._exit``, segfault, OOM kill): no polling,
  and a rank that dies silently is noticed through its exit code.
* **Kill on first failure.** When one rank fails, its peers are usually blocked in a collective
  that can never complete. Waiting for them would hang the cell, so the parent terminates every
  rank (SIGTERM, then SIGKILL) and raises :class:`RankFailedError` with the failing rank's
  traceback. A ``try/finally`` applies the same clean-up to every exit path (timeout,
  KeyboardInterrupt from an interrupted cell), so no rank outlives ``launch``. Ranks ignore
  SIGINT (the parent decides) and ask the kernel to kill them if the parent process dies.
* **Root cause, not symptom.** Peers of a failed rank fail too ("connection closed by peer").
  The parent gathers failures for a moment and reports the earliest one: reports carry the
  rank's ``time.monotonic()`` (one clock for all processes of a machine), and a rank that died
  without a report always counts as first. The peers' errors are listed after its traceback.
* **Quiet ranks.** With ``quiet=True`` (the default) a rank's file descriptors 1 and 2 point to
  /dev/null, so neither its prints nor gloo/NCCL's C++ logs land in the notebook.
* **Timeouts in two layers.** ``timeout`` bounds the whole launch; the process-group timeout is
  set a little longer, so a stuck collective still errors out on its own if the parent is gone,
  while the parent's :class:`LaunchTimeoutError` (which names the stuck ranks) comes first.

Invariants: ``launch`` returns only after every child has exited; its result has ``nprocs``
entries, entry ``r`` being rank ``r``'s return value.
"""
from __future__ import annotations

import datetime
import os
import pickle
import signal
import socket
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hybridpar.distributed.replies import (  # noqa: F401  (the errors are part of this module's API)
    KILL_GRACE_S,
    LaunchTimeoutError,
    PortTaken,
    RankFailedError,
    gather_replies,
    kill_all,
)

BACKENDS = ("auto", "gloo", "nccl")
_PG_TIMEOUT_SLACK_S = 10.0  # the process-group timeout exceeds the launch timeout by this much


def resolve_backend(backend: str, nprocs: int) -> str:
    """Map ``"auto"`` to ``"nccl"`` when there are at least ``nprocs`` GPUs, else ``"gloo"``;
    check that ``"nccl"`` has one GPU per rank."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gpus = torch.cuda.device_count()
    if backend == "auto":
        return "nccl" if 0 < nprocs <= gpus else "gloo"
    if backend == "nccl" and gpus < nprocs:
        raise ValueError(
            f"backend='nccl' needs one GPU per rank: {nprocs} ranks but {gpus} GPU(s) visible. "
            f"Use backend='gloo' (CPU) or nprocs<={gpus}." if gpus else
            f"backend='nccl' needs one GPU per rank: {nprocs} ranks but no GPU visible. Use backend='gloo'."
        )
    return backend


def current_device() -> torch.device:
    """The device this rank should put tensors on: its GPU under NCCL, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_torchrun() -> bool:
    """True inside a process started by ``torchrun`` / ``python -m torch.distributed.run``."""
    env = os.environ
    return "TORCHELASTIC_RUN_ID" in env or all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def setup_rank(backend: str, rank: int, world_size: int, local_rank: int, init_method: str,
                timeout: datetime.timedelta | None) -> None:
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)


def teardown_rank() -> None:
    # parallel_state is only torn down if fn imported it: nothing else can have initialised it.
    parallel_state = sys.modules.get("hybridpar.distributed.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_torchrun(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` as this rank of a ``torchrun`` job and return its value.

    Rendezvous is ``env://`` (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
    the backend is NCCL when every local rank has a GPU, else gloo. Set-up and teardown are the
    same as in :func:`launch`.
    """
    if not is_torchrun():
        raise RuntimeError("run_torchrun() must run inside torchrun (RANK/WORLD_SIZE/MASTER_ADDR unset); "
                           "in a notebook or plain script use hybridpar.launch(fn, nprocs) instead.")
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    backend = "nccl" if torch.cuda.device_count() >= local_world else "gloo"
    setup_rank(backend, rank, world_size, local_rank, "env://", None)
    try:
        return fn(*args, **kwargs)
    finally:
        teardown_rank()


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send this process ``sig`` when its parent dies (e.g. a killed Jupyter kernel)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def prepare_rank(rank: int, nprocs: int, port: int, quiet: bool) -> None:
    """A spawned rank's first lines: die with the parent, leave Ctrl-C to it, optionally silence fds 1 and 2."""
    set_parent_death_signal()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's job; it kills us.
    if quiet:  # fd-level, so C++ logs (gloo, NCCL) are silenced too
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(nprocs),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nprocs))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // nprocs))


def _worker(rank: int, nprocs: int, backend: str, port: int, timeout_s: float, quiet: bool,
            conn: Connection, fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Body of one spawned rank. Sends exactly one message on ``conn``."""
    prepare_rank(rank, nprocs, port, quiet)
    stage = "init"
    try:
        pg_timeout = datetime.timedelta(seconds=timeout_s + _PG_TIMEOUT_SLACK_S)
        setup_rank(backend, rank, nprocs, rank, f"tcp://127.0.0.1:{port}", pg_timeout)
        stage = "run"
        value = fn(*args, **kwargs)
        stage = "teardown"
        teardown_rank()
        stage = "sending the return value"
        try:
            payload = pickle.dumps(("ok", rank, value, 0.0))
        except Exception as exc:
            raise TypeError(f"rank {rank} returned a {type(value).__name__} that cannot be pickled, so it cannot "
                            f"be sent back to the parent ({exc}); return tensors, numbers, lists or dicts") from exc
    except BaseException:
        payload = pickle.dumps(("err", rank, f"[during {stage}]\n{traceback.format_exc()}", time.monotonic()))
        conn.send_bytes(payload)  # report first: teardown after a failed collective may block
        try:
            teardown_rank()
        finally:
            os._exit(1)
    conn.send_bytes(payload)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_launchable(fn: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    hint = "define the worker in an importable module, e.g. hybridpar.* or a .py file next to the notebook"
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    if getattr(fn, "__module__", None) == "__main__" and main_file is None:
        raise ValueError(f"{getattr(fn, '__qualname__', fn)!r} is defined in an interactive session "
                         f"(notebook cell / REPL); spawned ranks cannot import it: {hint}")
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise ValueError(f"fn {fn!r} cannot be pickled ({exc}), so spawned ranks cannot receive it "
                         f"(lambdas and nested functions are not picklable): {hint}") from exc
    try:
        pickle.dumps((args, kwargs))
    except Exception as exc:
        raise ValueError(f"the arguments for fn cannot be pickled ({exc}); pass tensors, numbers, "
                         "strings, lists, dicts or dataclasses") from exc


def launch(fn: Callable[..., Any], nprocs: int, *args: Any, backend: str = "auto", timeout: float = 120.0,
           quiet: bool = True, **kwargs: Any) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``nprocs`` ranks of a fresh process group; return values by rank.

    ``backend``: "auto" (NCCL with one GPU per rank, else gloo), "gloo" or "nccl". ``timeout``:
    seconds for the whole launch. ``quiet``: send the ranks' stdout/stderr to /dev/null (tracebacks
    still come back); pass ``quiet=False`` to see their prints. ``fn`` must be importable and its
    arguments and return value picklable. Raises :class:`RankFailedError` if a rank fails and
    :class:`LaunchTimeoutError` on timeout; no rank survives either.
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    backend = resolve_backend(backend, nprocs)
    check_launchable(fn, args, kwargs)
    try:
        return _launch_once(fn, nprocs, args, kwargs, backend, float(timeout), quiet)
    except PortTaken:  # another process grabbed the free port between probe and bind: retry once
        return _launch_once(fn, nprocs, args, kwargs, backend, float(timeout), quiet, port_retry=False)


def _launch_once(fn: Callable[..., Any], nprocs: int, args: tuple, kwargs: dict, backend: str, timeout: float,
                 quiet: bool, port_retry: bool = True) -> list[Any]:
    ctx = mp.get_context("spawn")
    port, deadline = free_port(), time.monotonic() + timeout
    procs: list[Any] = []
    conns: dict[Connection, int] = {}
    try:
        for rank in range(nprocs):
            reader, writer = ctx.Pipe(duplex=False)
            conns[reader] = rank
            p = ctx.Process(target=_worker, name=f"hybridpar-rank{rank}",  # not daemonic: ranks may spawn
                            args=(rank, nprocs, backend, port, timeout, quiet, writer, fn, args, kwargs))
            try:
                p.start()
            finally:
                writer.close()  # the child holds the only write end, so its death shows up as EOF
            procs.append(p)
        results = gather_replies(procs, dict(conns), deadline, timeout, port_retry=port_retry)
        for p in procs:
            p.join(timeout=KILL_GRACE_S)
        return [results[r] for r in range(nprocs)]
    finally:
        kill_all(procs)
        for conn in conns:
            conn.close()


