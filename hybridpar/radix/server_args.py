"""The serving knobs of RadixAttention under TP, in one validated dataclass (SGLang's ``ServerArgs``, trimmed).

Every rank of a tensor-parallel group must build its scheduler from the *same* arguments: the
pools are sized from them and rank 0's decisions are replayed on the others.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULE_POLICIES = ("lpm", "fcfs")


@dataclass(frozen=True)
class ServerArgs:
    """Memory, batching and scheduling configuration.

    Memory:
      ``page_size``: tokens per KV page (the radix tree and the allocator work in whole pages).
      ``max_total_tokens``: KV-pool capacity in tokens per rank (rounded down to pages). ``None``:
      derived from memory: on a GPU, ``mem_fraction_static`` of the device memory minus what is
      already used (weights); on the CPU, ``cpu_kv_cache_bytes``. The ranks agree on the minimum.
      ``max_running_requests``: rows of the request-to-token table (requests holding KV at once).
      ``max_context_len``: longest prompt + output; ``None``: the model's ``max_position_embeddings``.

    Scheduling:
      ``schedule_policy``: ``"lpm"`` (longest cached prefix first) or ``"fcfs"`` (arrival order).
      ``in_batch_prefix_caching`` (LPM, also while it falls back to arrival order): hold back
      candidates that share at least ``in_batch_deprioritize_threshold`` more tokens with one
      already admitted to the same prefill batch than with the cache, so the shared prefix is
      computed once and then hit next step
      (:class:`~hybridpar.radix.schedule_policy.InBatchPrefixFilter`).
      ``max_prefill_tokens``: new tokens per prefill step (a lone longer request still runs).
      ``chunked_prefill_size``: new tokens per step for chunking: a request longer than what is left
      of it gets a chunk of whole pages and resumes next step (``>= page_size``; ``None``: no chunking).
      ``init/min_new_token_ratio``, ``new_token_ratio_decay``: the fraction of each running
      request's remaining ``max_new_tokens`` reserved when admitting new requests; it decays per
      decode step and is reset to the initial value after a preemption (SGLang's estimate).

    ``disable_radix_cache``: serve without prefix reuse (the baseline). ``debug_checks``: run the
    cache integrity check after every step and verify every KV read (slow; for tests).
    ``use_cuda_graph``: run decode steps through a CUDA-graph runner (batched decode attention over
    static buffers, one graph per batch/length bucket; :mod:`hybridpar.models.cuda_graph`); on the
    CPU the same static path runs eagerly.
    """

    page_size: int = 16
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.85
    cpu_kv_cache_bytes: int = 64 << 20
    max_running_requests: int = 64
    max_context_len: int | None = None
    disable_radix_cache: bool = False
    schedule_policy: str = "lpm"
    in_batch_prefix_caching: bool = True
    in_batch_deprioritize_threshold: int = 32
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int | None = 8192
    init_new_token_ratio: float = 0.7
    min_new_token_ratio: float = 0.1
    new_token_ratio_decay: float = 0.001
    debug_checks: bool = False
    use_cuda_graph: bool = False

    def __post_init__(self) -> None:
        def positive_int(name: str, value: object, minimum: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")

        positive_int("page_size", self.page_size)
        if self.max_total_tokens is not None:
            positive_int("max_total_tokens", self.max_total_tokens, self.page_size)
        positive_int("max_running_requests", self.max_running_requests)
        positive_int("max_prefill_tokens", self.max_prefill_tokens)
        positive_int("cpu_kv_cache_bytes", self.cpu_kv_cache_bytes)
        if self.max_context_len is not None:
            positive_int("max_context_len", self.max_context_len, 2)
        positive_int("in_batch_deprioritize_threshold", self.in_batch_deprioritize_threshold, 1)
        if not 0.0 < self.mem_fraction_static <= 1.0:
            raise ValueError(f"mem_fraction_static must be in (0, 1], got {self.mem_fraction_static}")
        if self.schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"schedule_policy must be one of {SCHEDULE_POLICIES}, got {self.schedule_policy!r}")
        if self.chunked_prefill_size is not None:
            positive_int("chunked_prefill_size", self.chunked_prefill_size, self.page_size)
        if not 0.0 <= self.min_new_token_ratio <= self.init_new_token_ratio <= 1.0:
            raise ValueError(f"need 0 <= min_new_token_ratio ({self.min_new_token_ratio}) <= init_new_token_ratio "
                             f"({self.init_new_token_ratio}) <= 1")
        if self.new_token_ratio_decay < 0:
            raise ValueError(f"new_token_ratio_decay must be >= 0, got {self.new_token_ratio_decay}")
