"""The shared nouns of serving, on the ground floor: everything imports down into this module.

=====================  ======================================================================
noun                   what it is
=====================  ======================================================================
``SamplingParams``     how to pick tokens and when to stop (vLLM's names)
``Req``                a request as the KV-cache bookkeeping sees it (SGLang's ``Req``, trimmed)
``ServeReq``           ``Req`` + sampling, arrival and metrics: a request as the scheduler sees it
``StepPlan``           one step (a batch) as rank 0 decided it; every rank executes it
``RequestResult``      a finished request, as the scheduler returns it
``SchedulerMetrics``   cumulative counters of a scheduler
``SchedulerLoad``      what a scheduler holds right now (running, waiting, KV in use)
``StepRecord``         what one step did (the step log)
=====================  ======================================================================

Req's KV bookkeeping. A request's tokens are ``all_ids = origin_input_ids + output_ids``. Its KV
lives in row ``req_pool_idx`` of the :class:`~hybridpar.radix.mem_pool.ReqToTokenPool`:

* positions ``[0, cache_protected_len)`` hold slots owned by the radix tree; the request keeps
  them alive by holding one lock on ``last_node`` (the tree node that ends there);
* positions ``[cache_protected_len, kv_len)`` hold slots owned by the request itself;
* ``kv_len`` counts the positions that have a slot. The newest sampled token has none until the
  next decode step, so after prefill and ``k`` sampled tokens ``kv_len == len(all_ids) - 1``.

ServeReq's life cycle (all on TP rank 0)::

    pending --arrival_step--> waiting --admitted (start_req)--> prefill chunk(s) --first token--> running
       running --EOS / stop / max_new_tokens--> finished       running --preempted--> waiting (again)

A preempted request keeps its ``output_ids``; when readmitted it prefills ``prompt + outputs``
(mostly a cache hit) and continues, so its final output is the same as without preemption.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

# One pool change as rank 0 records it (:mod:`hybridpar.radix.pool_sync`): (name, args tuple, result or
# None). Plain ints and lists only, so it pickles small.
MemoryOp = tuple[str, tuple, Any]


@dataclass(frozen=True, init=False)
class SamplingParams:
    """How to pick tokens and when to stop; the names are vLLM's (keyword arguments only).

    ``max_tokens`` (alias ``max_new_tokens``, the field): generation stops after this many new
    tokens, or at an EOS token unless ``ignore_eos``, or when the text contains one of the ``stop``
    strings (the text is cut before it; finish reason ``"stop"``). ``temperature=0`` (the default,
    unlike vLLM's 1.0): greedy. ``top_k=0``: no top-k cut (vLLM's -1 means the same). ``top_p=1``: no
    nucleus cut. ``seed``: seeds this request's generator (``None``: seed 0).
    Bad values raise ``ValueError`` at construction, so they never reach a rank.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()

    def __init__(self, *, max_tokens: int | None = None, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, ignore_eos: bool = False,
                 stop: str | Sequence[str] | None = None) -> None:
        if max_tokens is not None and max_new_tokens is not None and max_tokens != max_new_tokens:
            raise ValueError(f"max_tokens={max_tokens} and max_new_tokens={max_new_tokens} disagree; give one of them")
        n = max_tokens if max_tokens is not None else 32 if max_new_tokens is None else max_new_tokens
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        top_k = 0 if top_k == -1 else top_k
        _check_int("max_tokens", n, 1)
        _check_int("top_k", top_k, 0, "(0 or -1 = off)")
        if seed is not None:
            _check_int("seed", seed, 0)
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
        if not isinstance(ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {ignore_eos!r}")
        if any(not isinstance(x, str) or not x for x in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        for name, value in (("max_new_tokens", n), ("temperature", float(temperature)), ("top_k", top_k),
                            ("top_p", float(top_p)), ("seed", seed), ("ignore_eos", ignore_eos), ("stop", stops)):
            object.__setattr__(self, name, value)

    @property
    def max_tokens(self) -> int:
        """vLLM's name for :attr:`max_new_tokens`."""
        return self.max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(0 if self.seed is None else self.seed)


def _check_int(name: str, value: object, low: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{' ' + note if note else ''}, got {value!r}")


@dataclass(eq=False)
class Req:
    """A request as seen by the KV-cache bookkeeping. Compared by identity."""

    rid: int | str
    origin_input_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    req_pool_idx: int | None = None
    # Slots of the tokens whose KV is already present when the next forward starts:
    # the matched cache prefix after admission, the whole row after a prefill chunk.
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: Any = None  # the prefix cache's node whose lock this request holds (a RadixCache TreeNode)
    cache_protected_len: int = 0
    kv_len: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids


@dataclass(eq=False)
class ServeReq(Req):
    """Extra state: sampling, arrival, metrics. ``cached_tokens`` is the prefix hit at first admission."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_step: int = 0
    arrival_seq: int = -1  # order of first entry into the waiting queue (FCFS key, kept on preemption)
    prompt_text: str | None = None
    generator: torch.Generator | None = None
    cached_tokens: int | None = None
    num_preemptions: int = 0
    finish_reason: str | None = None
    arrival_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = self.sampling.make_generator()

    @property
    def remaining_new_tokens(self) -> int:
        return self.sampling.max_new_tokens - len(self.output_ids)

    def reserved_tokens(self, new_token_ratio: float) -> int:
        """KV slots set aside for this request's future decode steps when admitting others."""
        return math.ceil(self.remaining_new_tokens * new_token_ratio)

    def reset_for_retract(self) -> None:
        """Forget KV bookkeeping after the hooks released it; outputs and sampling state stay."""
        self.kv_len = 0
        self.num_preemptions += 1


class RequestTooLargeError(ValueError):
    """A request that can never be served: its prompt + max_new_tokens exceed the KV pool or the context."""


@dataclass
class StepPlan:
    """One step as decided on rank 0; every rank executes it identically.

    ``kind``: ``"prefill"``, ``"decode"`` or ``"done"`` (``payload`` = results and metrics). ``mem_ops``: pool changes to replay first. Batch
    entry ``i`` uses row ``req_pool_indices[i]``, has ``prefix_lens[i]`` tokens of KV already and
    brings ``extend_lens[i]`` new ones, whose ids are the ``i``-th segment of ``input_ids`` and whose
    KV goes to the same segment of ``out_cache_loc``. ``sample_rows``: entries whose last new token
    yields the next token (the others are non-final prefill chunks).
    """

    kind: str
    mem_ops: list[MemoryOp] = field(default_factory=list)
    rids: list[int] = field(default_factory=list)
    req_pool_indices: list[int] = field(default_factory=list)
    prefix_lens: list[int] = field(default_factory=list)
    extend_lens: list[int] = field(default_factory=list)
    input_ids: list[int] = field(default_factory=list)
    out_cache_loc: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)
    payload: Any = None


@dataclass
class RequestResult:
    """A finished request. ``text`` is decoded only for text prompts. Times are seconds on rank 0."""

    rid: int
    prompt_ids: list[int]
    output_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    cached_tokens: int  # prompt tokens served from the radix cache at first admission
    num_preemptions: int
    ttft_s: float  # arrival -> first token
    latency_s: float  # arrival -> last token
    text: str | None = None


@dataclass
class SchedulerMetrics:
    """Cumulative counters of one scheduler (rank 0's, copied to every rank by the ``done`` plan)."""

    prompt_tokens: int = 0  # prompts of admitted requests, each counted once
    cached_prompt_tokens: int = 0  # of which served from the cache at first admission
    prefill_tokens_computed: int = 0  # tokens run through prefill (recomputation after preemption included)
    decode_tokens: int = 0
    generated_tokens: int = 0
    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0
    evicted_tokens: int = 0
    finished_requests: int = 0
    wall_s: float = 0.0

    @property
    def cache_hit_rate(self) -> float:
        """Cached prompt tokens / prompt tokens (SGLang's metric)."""
        return self.cached_prompt_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def output_tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def total_tokens_per_s(self) -> float:
        return (self.prompt_tokens + self.generated_tokens) / self.wall_s if self.wall_s else 0.0


@dataclass(frozen=True)
class SchedulerLoad:
    """What a scheduler holds right now (rank 0): a server's gauges. ``kv_used_tokens`` counts slots held
    by requests; cache the tree could evict counts as free."""

    running: int = 0
    waiting: int = 0
    kv_used_tokens: int = 0
    kv_total_tokens: int = 0

    def __add__(self, other: SchedulerLoad) -> SchedulerLoad:
        return SchedulerLoad(self.running + other.running, self.waiting + other.waiting,
                             self.kv_used_tokens + other.kv_used_tokens, self.kv_total_tokens + other.kv_total_tokens)

    @property
    def kv_usage(self) -> float:
        """Share of the KV pool held by requests, 0..1 (vLLM's ``kv_cache_usage_perc``)."""
        return self.kv_used_tokens / self.kv_total_tokens if self.kv_total_tokens else 0.0


@dataclass
class StepRecord:
    """What one step did (rank 0's ``step_log``, for the book's explorer and for debugging)."""

    kind: str
    rids: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    free_tokens: int  # after the step's allocations
    evictable_tokens: int
    running: int
    waiting: int
