"""Persistent ranks: start N processes once, then call methods on all of them many times.

:func:`~hybridpar.distributed.launcher.launch` runs one function and tears the ranks down. A
serving engine must keep its ranks (model weights, KV cache, radix tree) between requests, as
vLLM's executor and SGLang's scheduler processes do. ``RankPool(factory, n, *args)`` spawns ``n``
ranks that form one ``torch.distributed`` world and build ``factory(*args)`` each; then
``pool.call("method", ...)`` runs ``obj.method(...)`` on every rank and returns the values in
rank order::

    pool = RankPool(EngineWorker, 2, config)     # ranks start, load the model
    pool.call("generate", requests)              # many times; same PIDs every call
    pool.close()                                 # or `with RankPool(...) as pool:`

Inside a rank, :func:`report_progress` sends a progress message that the parent hands to the
``on_progress`` callback of the running call (tqdm bars, streamed tokens). The other way,
``pool.post(rank, payload)`` puts a message in a rank's inbox while a call runs there, and the
method reads it with :func:`read_inbox` (an online engine receives requests and aborts so).

Faults. Every rank reports a failure out of band, on its own pipe, and exits; it never tells its
peers through a collective they may not be in. The parent wakes on that report (or on the death
of a process), waits :data:`~hybridpar.distributed.replies._SETTLE_S` for the root cause, kills
every rank and raises :class:`~hybridpar.distributed.replies.RankFailedError` with the failing
rank's traceback. The pool is then *broken*: further calls raise :class:`PoolBrokenError`. A call
interrupted by Ctrl-C or a timeout breaks it too (its ranks may be inside a collective). ``close``,
``with``, garbage collection and interpreter exit all end the ranks; ranks die with the parent.
"""
from __future__ import annotations

import datetime
import os
import pickle
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from typing import Any, Callable

import torch.multiprocessing as mp

from hybridpar.distributed.launcher import (
    check_launchable,
    free_port,
    prepare_rank,
    resolve_backend,
    setup_rank,
    teardown_rank,
)
from hybridpar.distributed.replies import KILL_GRACE_S, gather_replies, kill_all

_PG_TIMEOUT = datetime.timedelta(days=7)  # ranks idle between calls; the parent watches for faults
_CONN: Connection | None = None  # in a rank: its pipe to the parent
_INBOX = "inbox"  # tags a posted message (a call is (method, args, kwargs); None ends the rank)
_CHANNEL: Any = None  # in a rank started by another executor (Ray): its channel to the driver


class PoolBrokenError(RuntimeError):
    """The pool's ranks are gone (a rank failed, a call was interrupted, or it was closed)."""


def report_progress(payload: Any) -> None:
    """Inside a pool rank: send ``payload`` to the parent's ``on_progress``. Elsewhere: nothing."""
    if _CHANNEL is not None:
        _CHANNEL.report_progress(payload)
    elif _CONN is not None:
        _CONN.send_bytes(pickle.dumps(("progress", int(os.environ.get("RANK", 0)), payload, 0.0)))


def read_inbox(timeout: float) -> list[Any]:
    """Inside a pool rank, during a call: the payloads ``post``-ed to this rank, waiting up to ``timeout`` s
    for the first. Elsewhere: ``[]``."""
    if _CHANNEL is not None:
        return _CHANNEL.read_inbox(timeout)
    if _CONN is None or not _CONN.poll(timeout):
        return []
    payloads = []
    while True:
        _, payload = pickle.loads(_CONN.recv_bytes())  # only posts arrive while a call runs
        payloads.append(payload)
        if not _CONN.poll(0):
            return payloads


def _rank_main(rank: int, nprocs: int, backend: str, port: int, quiet: bool, conn: Connection,
               factory: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """Body of one pool rank: build the object, then serve calls until the parent says stop."""
    global _CONN
    prepare_rank(rank, nprocs, port, quiet)
    _CONN = conn
    stage = "init"
    try:
        setup_rank(backend, rank, nprocs, rank, f"tcp://127.0.0.1:{port}", _PG_TIMEOUT)
        stage = "start-up"
        obj = factory(*args, **kwargs)
        conn.send_bytes(pickle.dumps(("ok", rank, None, 0.0)))
        while True:
            message = pickle.loads(conn.recv_bytes())
            if message is None:
                break
            if message[0] is _INBOX:
                continue  # posted after the call that would have read it returned: nobody to read it
            method, m_args, m_kwargs = message
            stage = method
            value = getattr(obj, method)(*m_args, **m_kwargs)
            conn.send_bytes(pickle.dumps(("ok", rank, value, 0.0)))
        stage = "shutdown"
        close = getattr(obj, "close", None)
        if close is not None:
            close()
        teardown_rank()
    except BaseException:
        conn.send_bytes(pickle.dumps(("err", rank, f"[during {stage}]\n{traceback.format_exc()}", time.monotonic())))
        os._exit(1)  # no teardown: after a failed collective it may block


class RankPool:
    """``nprocs`` persistent ranks, each holding ``factory(*args, **kwargs)``; see the module docstring.

    ``backend``: "auto" (NCCL with one GPU per rank, else gloo), "gloo" or "nccl".
    ``start_timeout``: seconds for start-up (process group + factory). ``quiet``: ranks' stdout and
    stderr go to /dev/null. ``pids``: the ranks' process ids.
    """

    def __init__(self, factory: Callable[..., Any], nprocs: int, *args: Any, backend: str = "auto",
                 start_timeout: float = 300.0, quiet: bool = True, **kwargs: Any) -> None:
        if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
            raise ValueError(f"nprocs must be an int >= 1, got {nprocs!r}")
        self.backend = resolve_backend(backend, nprocs)
        check_launchable(factory, args, kwargs)
        self.nprocs = nprocs
        self._procs: list[Any] = []
        self._conns: dict[Connection, int] = {}
        self._broken: str | None = None
        self._graceful = [True]  # False once a call failed: ranks may sit in a collective, kill at once
        ctx = mp.get_context("spawn")
        port = free_port()
        self._finalizer = weakref.finalize(self, _shutdown, self._procs, self._conns, self._graceful)
        for rank in range(nprocs):
            parent_end, child_end = ctx.Pipe(duplex=True)
            self._conns[parent_end] = rank
            p = ctx.Process(target=_rank_main, name=f"hybridpar-rank{rank}",
                            args=(rank, nprocs, self.backend, port, quiet, child_end, factory, args, kwargs))
            p.start()
            child_end.close()
            self._procs.append(p)
        self.pids: list[int] = [p.pid for p in self._procs]
        self._by_rank = {rank: conn for conn, rank in self._conns.items()}
        self._post_lock = threading.Lock()
        self._wait("start-up", start_timeout, None)

    @property
    def alive(self) -> bool:
        return self._broken is None

    def call(self, method: str, *args: Any, timeout: float = 3600.0,
             on_progress: Callable[[int, Any], None] | None = None, **kwargs: Any) -> list[Any]:
        """Run ``method(*args, **kwargs)`` on every rank's object; return the values in rank order."""
        if self._broken is not None:
            raise PoolBrokenError(f"this engine's ranks are gone ({self._broken}); build a new one")
        message = pickle.dumps((method, args, kwargs))
        with self._post_lock:
            for conn in self._conns:
                try:
                    conn.send_bytes(message)
                except OSError:  # the rank is dead; gather_replies reports it
                    pass
        return self._wait(f"call {method!r}", timeout, on_progress)

    def post(self, rank: int, payload: Any) -> None:
        """Put ``payload`` in rank ``rank``'s inbox, for the call running there (:func:`read_inbox`).

        Thread-safe against a ``call`` waiting in another thread. A dead rank drops it; the running
        call then fails with that rank's error."""
        if self._broken is not None:
            raise PoolBrokenError(f"this engine's ranks are gone ({self._broken}); build a new one")
        with self._post_lock:
            try:
                self._by_rank[rank].send_bytes(pickle.dumps((_INBOX, payload)))
            except OSError:
                pass

    def _wait(self, what: str, timeout: float, on_progress: Callable[[int, Any], None] | None) -> list[Any]:
        try:
            replies = gather_replies(self._procs, self._conns, time.monotonic() + timeout, timeout, on_progress)
        except BaseException as exc:  # a rank failed, a timeout, Ctrl-C: no rank state can be trusted
            self._broken = f"{what} failed: {type(exc).__name__}"
            self._graceful[0] = False
            self._finalizer()
            raise
        return [replies[r] for r in range(self.nprocs)]

    def close(self) -> None:
        """End every rank (gracefully when they are idle); idempotent."""
        if self._broken is None:
            self._broken = "closed"
        self._finalizer()

    def __enter__(self) -> RankPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _shutdown(procs: list[Any], conns: dict[Connection, int], graceful: list[bool]) -> None:
    """Ask idle ranks to return, then kill whatever is left (also at interpreter exit)."""
    if graceful[0]:
        for conn in conns:
            try:
                conn.send_bytes(pickle.dumps(None))
            except OSError:
                pass
        end = time.monotonic() + KILL_GRACE_S
        for p in procs:
            p.join(timeout=max(0.0, end - time.monotonic()))
    kill_all(procs)
    for conn in conns:
        conn.close()
    procs.clear()
    conns.clear()
