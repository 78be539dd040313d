"""The online loop: one replica's scheduler serves requests that arrive and leave while it runs.

``LLM.generate`` hands the ranks a whole batch and waits for all of it. A server cannot: requests
arrive at any time and a client may leave mid-stream. So the ranks run one long call,
:meth:`~hybridpar.engine.worker.EngineWorker.serve`, and the leader of each replica (TP rank 0)
runs :func:`serve_online`, SGLang's event loop in miniature::

    loop:
        take the commands posted since the last step (rank inbox)      add / abort / stop
        run one step if any request waits or runs                       TPScheduler.step
        report what the step produced (progress channel)                tokens, finished, load

The other ranks of the replica follow the leader's plans as in a batch run, and the leader's
``done`` plan, sent when a ``stop`` command has emptied the scheduler, ends every loop. Commands
are handled only between steps, so an abort never races a forward pass: the aborted request's KV
goes to the radix tree as evictable cache, exactly as a finished request's does.

Commands (tuples, from :class:`~hybridpar.engine.async_llm.AsyncLLM`)::

    ("add", request_id, prompt_ids, SamplingParams)   queue a request now
    ("abort", request_id)                            drop it wherever it is
    ("stop",)                                        abort what is left, end the loop

Each report is a :class:`StepReport`.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from hybridpar.core import RequestResult, RequestTooLargeError, SchedulerLoad

IDLE_WAIT_S = 0.5  # how long an idle leader blocks on its inbox before looking again


@dataclass
class StepReport:
    """What the leader tells the parent after a step or a batch of commands.

    ``tokens``: ``(request_id, token_id)`` sampled this step, in order. ``finished``: requests that
    ended (their :class:`RequestResult`, with ``finish_reason`` ``"abort"`` for aborted ones).
    ``rejected``: ``(request_id, message)`` for requests that can never run on this replica.
    """

    replica: int
    tokens: list[tuple[Any, int]] = field(default_factory=list)
    finished: list[RequestResult] = field(default_factory=list)
    rejected: list[tuple[Any, str]] = field(default_factory=list)
    load: SchedulerLoad = field(default_factory=SchedulerLoad)


def serve_online(sched: Any, replica: int, read_inbox: Callable[[float], list[Any]],
                 emit: Callable[[StepReport], None]) -> None:
    """Run ``sched`` (a TPScheduler leader) online until a ``stop`` command; see the module docstring."""
    start = time.perf_counter()
    sched.step_log = deque(maxlen=256)  # a server runs for days: keep only the recent steps
    report = StepReport(replica)
    sched.on_token = lambda req, tok: report.tokens.append((req.rid, tok))
    results: dict[Any, RequestResult] = {}
    stopping = False
    while not stopping or sched.busy():
        commands = read_inbox(0.0 if sched.busy() else IDLE_WAIT_S)
        for command in commands:
            stopping = _apply(sched, command, report) or stopping
        ran = sched.busy() and sched.step(results)
        if sched.busy() and not ran:
            raise RuntimeError(f"{type(sched).__name__} stalled: requests wait and nothing can run")
        report.finished.extend(results.values())
        results.clear()
        if ran or commands:
            report.load = sched.load()
            emit(report)
            report = StepReport(replica)
    sched.on_token = None
    sched.finish(results, start)


def _apply(sched: Any, command: tuple, report: StepReport) -> bool:
    """Carry out one command between steps; True for ``stop``."""
    kind = command[0]
    if kind == "add":
        _, rid, ids, sampling = command
        try:
            sched.submit(rid, ids, sampling)
        except RequestTooLargeError as exc:
            report.rejected.append((rid, str(exc)))
    elif kind == "abort":
        _abort(sched, command[1], report)
    elif kind == "stop":
        for rid in [r.rid for r in sched.live_requests()]:
            _abort(sched, rid, report)
        return True
    else:
        raise ValueError(f"unknown engine command {kind!r}")
    return False


def _abort(sched: Any, rid: Any, report: StepReport) -> None:
    result = sched.abort(rid)
    if result is not None:
        report.finished.append(result)
