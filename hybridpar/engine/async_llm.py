"""``AsyncLLM``: the engine for a server -- requests come and go while the ranks keep running.

::

    engine = AsyncLLM(tensor_parallel_size=2)          # starts the ranks (an LLM underneath)
    engine.start()                                     # inside the server's event loop
    async for delta in engine.generate(ids, SamplingParams(max_tokens=16), "req-1"):
        ...                                            # delta.token_ids, then delta.finished
    await engine.shutdown()                            # drain, stop the online loops, end the ranks

The ranks run one long call, ``serve`` (:mod:`hybridpar.engine.online`), started from a thread of
this process; requests and aborts travel to each replica's leader through its inbox
(``executor.post``), and every step's :class:`~hybridpar.engine.online.StepReport` comes back
through the progress channel, is handed to the event loop and routed to each request's queue.
Leaving a ``generate`` early (a client that disconnects) aborts the request on the ranks, which
return its KV slots to the pool. A rank that fails ends every open ``generate`` with
:class:`EngineDeadError` and leaves :attr:`AsyncLLM.errored` set; the ranks are gone by then.
"""
from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from hybridpar.core import RequestResult, SamplingParams, SchedulerLoad
from hybridpar.engine.llm import LLM
from hybridpar.engine.online import StepReport


class EngineDeadError(RuntimeError):
    """The engine's ranks are gone (a rank failed); no request can be served."""


class RequestRejectedError(ValueError):
    """The engine refused a request it can never serve (too large for the KV pool)."""


@dataclass
class StreamDelta:
    """What one request gained since the last delta: new token ids, and its result once it ended."""

    token_ids: list[int]
    finished: RequestResult | None = None


class AsyncLLM:
    """An :class:`LLM` whose ranks serve online; see the module docstring. Arguments: :class:`LLM`'s."""

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.llm = LLM(model, **engine_args)
        self.tokenizer = self.llm.get_tokenizer()
        self.errored: BaseException | None = None
        self.final_stats: list[Any] | None = None
        self.load: dict[int, SchedulerLoad] = {r: SchedulerLoad() for r in range(self.llm.num_replicas)}
        self._queues: dict[str, asyncio.Queue] = {}
        self._replica_of: dict[str, int] = {}  # live requests (until their result comes back)
        self._accepting = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.on_dead: Callable[[BaseException], None] | None = None  # called in the event loop when a rank fails

    # ---------------------------------------------------------------- lifetime
    def start(self) -> None:
        """Start the ranks' online loops; call it inside the event loop that will call ``generate``."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run_ranks, name="hybridpar-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        """Every rank is up and serving."""
        return self._thread is not None and self._thread.is_alive() and self.errored is None

    @property
    def num_requests(self) -> int:
        """Requests sent to the ranks whose result has not come back."""
        return len(self._replica_of)

    def total_load(self) -> SchedulerLoad:
        return sum(self.load.values(), SchedulerLoad())

    async def shutdown(self, drain_timeout: float = 30.0) -> None:
        """Refuse new requests, let live ones finish (at most ``drain_timeout`` s), then end the ranks."""
        self._accepting = False
        loop = asyncio.get_running_loop()
        end = loop.time() + drain_timeout
        while self._replica_of and self.errored is None and loop.time() < end:
            await asyncio.sleep(0.02)
        if self.is_running:
            for replica in range(self.llm.num_replicas):  # aborts what is left, then the loops end
                self.llm.executor.post(self.llm.reporter_rank(replica), ("stop",))
            await asyncio.to_thread(self._thread.join, 60.0)
        self.llm.shutdown()

    def _run_ranks(self) -> None:
        try:
            self.final_stats = self.llm.executor.call("serve", timeout=math.inf, on_progress=self._on_progress)
        except BaseException as exc:  # a rank failed: the executor has ended every rank
            self.errored = exc
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._fail_all, exc)

    # ---------------------------------------------------------------- requests
    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[StreamDelta]:
        """Serve one request; yields deltas, the last with ``finished`` set. Checks the request first."""
        ids = list(prompt_ids)
        self.llm.check_request(ids, params)
        if self.errored is not None or not self.is_running:
            raise EngineDeadError(f"the engine is not running ({self.errored or 'stopped'})")
        if not self._accepting:
            raise EngineDeadError("the engine is shutting down and takes no new requests")
        if request_id in self._replica_of:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        replica = min(range(self.llm.num_replicas),
                      key=lambda r: sum(1 for x in self._replica_of.values() if x == r))  # fewest live requests
        self._queues[request_id], self._replica_of[request_id] = queue, replica
        self.llm.executor.post(self.llm.reporter_rank(replica), ("add", request_id, ids, params))
        finished = False
        try:
            while not finished:
                delta = StreamDelta([])
                item = await queue.get()
                while True:
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, RequestResult):
                        delta.finished, finished = item, True
                    else:
                        delta.token_ids.append(item)
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                yield delta
        finally:
            self._queues.pop(request_id, None)
            if not finished and self.is_running and request_id in self._replica_of:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Ask the ranks to drop ``request_id`` (its KV slots return to the pool); unknown ids are ignored."""
        replica = self._replica_of.get(request_id)
        if replica is not None and self.is_running:
            self.llm.executor.post(self.llm.reporter_rank(replica), ("abort", request_id))

    # ---------------------------------------------------------------- reports (event-loop thread)
    def _on_progress(self, rank: int, report: StepReport) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, report)

    def _dispatch(self, report: StepReport) -> None:
        self.load[report.replica] = report.load
        for rid, token in report.tokens:
            self._put(rid, token)
        for result in report.finished:
            self._replica_of.pop(result.rid, None)
            self._put(result.rid, result)
        for rid, message in report.rejected:
            self._replica_of.pop(rid, None)
            self._put(rid, RequestRejectedError(message))

    def _put(self, rid: str, item: Any) -> None:
        queue = self._queues.get(rid)
        if queue is not None:  # else its consumer has left (aborted)
            queue.put_nowait(item)

    def _fail_all(self, exc: BaseException) -> None:
        for rid in list(self._queues):
            self._put(rid, EngineDeadError(f"the engine's ranks are gone: {str(exc).splitlines()[0]}"))
        self._replica_of.clear()
        if self.on_dead is not None:
            self.on_dead(exc)
