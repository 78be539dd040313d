"""Collecting the ranks' replies in the parent, and what goes wrong with ranks.

Shared by :func:`~hybridpar.distributed.launcher.launch` (one reply per rank) and
:class:`~hybridpar.distributed.rank_pool.RankPool` (one reply per rank and call, with progress
messages in between). Every message a rank sends is a pickled ``(status, rank, value, t)`` with
``status`` one of ``"ok"``, ``"err"`` (``value``: the traceback text) or ``"progress"``; ``t`` is the
rank's ``time.monotonic()`` when it failed (one clock for all processes of a machine), which picks
the root cause among several failures.
"""
from __future__ import annotations

import pickle
import signal
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Callable

KILL_GRACE_S = 2.0  # SIGTERM, wait this long, then SIGKILL
_SETTLE_S = 0.5  # after a first failure, collect others this long to find the root cause
_POLL_S = 0.25  # longest single wait, so that a pending Ctrl-C is acted on promptly


class PortTaken(Exception):
    """Rank 0 could not listen on the probed port: someone else took it in between."""


class RankFailedError(RuntimeError):
    """A rank raised an exception or exited without reporting a result.

    ``rank`` is the failing rank, ``remote_traceback`` the traceback text formatted in that rank
    (empty when the process died without one), ``exitcode`` its exit code when it died silently.
    ``note`` is a hint; ``consequences`` lists the errors of peers that failed afterwards.
    """

    def __init__(self, rank: int, remote_traceback: str, exitcode: int | None = None, note: str = "",
                 consequences: str = ""):
        self.rank, self.remote_traceback, self.exitcode = rank, remote_traceback, exitcode
        self.note, self.consequences = note, consequences
        if exitcode is None:
            msg = f"rank {rank} failed"
        else:
            msg = f"rank {rank} exited with code {exitcode}{_signal_suffix(exitcode)} without reporting a result"
        msg += f"; {note}" if note else ""
        msg += f"\n\n--- traceback from rank {rank} ---\n{remote_traceback.rstrip()}" if remote_traceback else ""
        msg += f"\n\nOther ranks failed afterwards, probably as a consequence:\n{consequences}" if consequences else ""
        super().__init__(msg)

    def __reduce__(self):
        return type(self), (self.rank, self.remote_traceback, self.exitcode, self.note, self.consequences)


class LaunchTimeoutError(TimeoutError):
    """Some ranks were still running when the launch timeout expired; all were killed."""

    def __init__(self, ranks: list[int], timeout: float):
        self.ranks, self.timeout = ranks, timeout
        super().__init__(
            f"launch timed out after {timeout:g} s; ranks {ranks} were still running and have been killed. "
            "A common cause is a collective that not every rank entered (a peer skipped it, called a "
            "different collective, or used a different order), or a rank waiting on a peer that died. "
            "If the work is just slow, pass a larger timeout=."
        )

    def __reduce__(self):
        return type(self), (self.ranks, self.timeout)


def _signal_suffix(exitcode: int) -> str:
    if exitcode >= 0:
        return ""
    try:
        return f" ({signal.Signals(-exitcode).name})"
    except ValueError:
        return ""


@dataclass
class _Failure:
    rank: int
    traceback: str
    seen: float  # parent clock, when the parent learnt of it
    raised_at: float  # rank clock (CLOCK_MONOTONIC is system-wide on Linux); -inf for silent deaths
    exitcode: int | None = None


def _root_cause(failures: list[_Failure]) -> RankFailedError:
    """Pick the failure that happened first; a silent death always counts as a cause, never an effect.

    When one rank fails, its peers fail next inside the collective they were waiting in
    ("connection closed by peer"); those errors are symptoms, listed in the note.
    """
    first = min(failures, key=lambda f: f.raised_at)
    note = ""
    if first.exitcode is not None:
        note = ("it was killed or crashed (segfault, out of memory, os._exit). If it died at start-up, rerun with "
                "quiet=False to see its stderr; scripts must call launch() under `if __name__ == '__main__':`")
    consequences = "\n".join(
        f"  rank {f.rank}: " + (f.traceback.strip().splitlines() or [f"exit code {f.exitcode}"])[-1]
        for f in failures if f is not first)
    return RankFailedError(first.rank, first.traceback, first.exitcode, note, consequences)


def gather_replies(procs: list[Any], conns: dict[Connection, int], deadline: float, timeout: float,
                   on_progress: Callable[[int, Any], None] | None = None, port_retry: bool = False) -> dict[int, Any]:
    """Wait until every rank in ``conns`` has replied ``"ok"``; return ``{rank: value}``.

    Wakes on any pipe and on any process sentinel, so a rank that reports or dies is seen at once.
    ``("progress", rank, payload, t)`` messages go to ``on_progress`` and the rank is waited for
    further. On a failure the others get :data:`_SETTLE_S` to fail too, then the root cause is raised
    (:class:`RankFailedError`); past ``deadline``, :class:`LaunchTimeoutError`. Kills nobody: the
    caller does (``kill_all``).
    """
    nprocs = len(conns)
    waiting = dict(conns)
    sentinels = {procs[r].sentinel: r for r in waiting.values()}
    results: dict[int, Any] = {}
    failures: list[_Failure] = []
    while len(results) + len(failures) < nprocs:
        # After a first failure, let secondary failures arrive so that the root cause can be picked.
        limit = min(deadline, failures[0].seen + _SETTLE_S) if failures else deadline
        # Wait in short slices: a Ctrl-C (SIGINT) that lands on another thread of this process, as
        # it can in a Jupyter kernel, raises KeyboardInterrupt only when the main thread runs Python.
        ready = wait(list(waiting) + list(sentinels), timeout=min(_POLL_S, max(0.0, limit - time.monotonic())))
        if not ready:
            if time.monotonic() < limit:
                continue
            if failures:
                break
            raise LaunchTimeoutError(sorted(r for r in conns.values() if r not in results), timeout)
        for conn in [c for c in ready if c in waiting]:
            _receive(conn, waiting, results, failures, on_progress, port_retry)
        for s in [s for s in ready if s in sentinels]:
            rank = sentinels.pop(s)
            if rank in results or any(f.rank == rank for f in failures):
                continue
            reader = next((c for c, r in waiting.items() if r == rank), None)
            while reader is not None and reader in waiting and reader.poll():  # reports may still sit in the pipe
                _receive(reader, waiting, results, failures, on_progress, port_retry)
            if rank not in results and not any(f.rank == rank for f in failures):
                procs[rank].join(timeout=KILL_GRACE_S)  # the sentinel can fire before waitpid sees the exit
                failures.append(_Failure(rank, "", time.monotonic(), float("-inf"), procs[rank].exitcode))
    if failures:
        raise _root_cause(failures)
    return results


def _receive(conn: Connection, waiting: dict[Connection, int], results: dict[int, Any], failures: list[_Failure],
             on_progress: Callable[[int, Any], None] | None, port_retry: bool) -> None:
    """Read one message of a rank: progress, its result (into ``results``) or its failure."""
    rank = waiting[conn]
    try:
        data = conn.recv_bytes()
    except (EOFError, OSError):
        del waiting[conn]
        return  # died without reporting; its sentinel handles it
    now = time.monotonic()
    try:
        status, _, value, raised_at = pickle.loads(data)
    except Exception:
        del waiting[conn]
        failures.append(_Failure(rank, "its return value could not be unpickled in the parent (is its class "
                                       f"importable here?)\n{traceback.format_exc()}", now, now))
        return
    if status == "progress":
        if on_progress is not None:
            on_progress(rank, value)
        return
    del waiting[conn]
    if status == "ok":
        results[rank] = value
    elif port_retry and value.startswith("[during init]") and "address already in use" in value.lower():
        raise PortTaken()
    else:
        failures.append(_Failure(rank, value, now, raised_at))


def kill_all(procs: list[Any]) -> None:
    """SIGTERM every live child, SIGKILL those still alive after a grace period, and reap all."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + KILL_GRACE_S
    for p in procs:
        p.join(timeout=max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
        p.close()
