"""Configuration dataclasses shared by the library, the launcher and the CLI.

:class:`ServerArgs` holds the serving knobs (pools, batching, scheduling) that the model wrapper,
the schedulers and the engine share. :class:`ParallelConfig` is the single place where the sizes of the parallel
dimensions (TP, PP, DP, TKNP) are checked. :func:`hybridpar.distributed.
parallel_state.compute_layout` builds one and calls :meth:`ParallelConfig.validate`,
so every entry point (Python API, CLI, notebooks) rejects bad input with the same
message, before any process is spawned.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import NoReturn


def config_error(prog: str, exc: object) -> NoReturn:
    """Print ``prog: error: <first line of exc>`` once and exit 2 (the commands' configuration errors).

    Under torchrun only rank 0 prints and fails; the other ranks found the same error and exit
    quietly (status 0), so that torchrun cannot kill rank 0 before it has printed.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        raise SystemExit(0)
    print(f"{prog}: error: {exc}".splitlines()[0], file=sys.stderr)
    raise SystemExit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse for hybridpar's commands: a bad argument is one line (:func:`config_error`), without
    the usage block that argparse prints first (``-h`` still shows it). Subcommands inherit it."""

    def error(self, message: str) -> NoReturn:
        config_error(self.prog, message)


class ParallelConfigError(ValueError):
    """A parallel configuration that cannot be laid out; the message names the fix."""


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParallelConfigError(
            f"{name} must be an int >= 1, got {value!r} ({type(value).__name__}); "
            f"pass a positive integer (1 turns the dimension off)."
        )
    if value < 1:
        raise ParallelConfigError(
            f"{name} must be >= 1, got {value}; pass a positive integer (1 turns the dimension off)."
        )


@dataclass
class ParallelConfig:
    """Sizes of the parallel dimensions of one model replica group.

    Invariants checked by :meth:`validate`:

    * every size is an ``int >= 1``;
    * token parallelism (TKNP) and data parallelism (DP) are mutually exclusive:
      TKNP takes the place of the DP dimension in the rank layout;
    * ``enable_token_parallel`` agrees with ``token_parallel_size``
      (``None`` means "infer it": enabled iff ``token_parallel_size > 1``).
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    token_parallel_size: int = 1
    enable_token_parallel: bool | None = None

    @property
    def token_parallel_enabled(self) -> bool:
        """``enable_token_parallel`` with ``None`` resolved to ``token_parallel_size > 1``."""
        if self.enable_token_parallel is None:
            return self.token_parallel_size > 1
        return self.enable_token_parallel

    @property
    def world_size(self) -> int:
        """Ranks one instance of this configuration occupies: tp * pp * tknp * dp."""
        return (
            self.tensor_parallel_size
            * self.pipeline_parallel_size
            * self.token_parallel_size
            * self.data_parallel_size
        )

    def validate(self) -> ParallelConfig:
        """Raise :class:`ParallelConfigError` if the sizes are inconsistent; return ``self``."""
        for name in (
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "data_parallel_size",
            "token_parallel_size",
        ):
            _check_positive_int(name, getattr(self, name))
        enable = self.enable_token_parallel
        if enable is not None and not isinstance(enable, bool):
            raise ParallelConfigError(
                f"enable_token_parallel must be True, False or None (infer), got {enable!r}."
            )
        tknp = self.token_parallel_size
        if enable is True and tknp <= 1:
            raise ParallelConfigError(
                f"enable_token_parallel=True needs token_parallel_size >= 2, got {tknp}; "
                f"set token_parallel_size to the number of ranks per token-parallel group, "
                f"or leave enable_token_parallel=None."
            )
        if enable is False and tknp > 1:
            raise ParallelConfigError(
                f"token_parallel_size={tknp} but enable_token_parallel=False; set "
                f"enable_token_parallel=True (or None to infer it), or token_parallel_size=1."
            )
        if self.token_parallel_enabled and self.data_parallel_size > 1:
            raise ParallelConfigError(
                f"token parallelism (token_parallel_size={tknp}) and data parallelism "
                f"(data_parallel_size={self.data_parallel_size}) are mutually exclusive: TKNP "
                f"replaces the DP dimension. Pick one: set data_parallel_size=1 to use TKNP, "
                f"or token_parallel_size=1 to use DP."
            )
        return self

    def check_world_size(self, world_size: int) -> ParallelConfig:
        """Validate, then require ``world_size == tp * tknp * pp * dp`` exactly; return ``self``.

        For entry points that run exactly one instance of the configuration (the CLI, torchrun
        scripts). :func:`~hybridpar.distributed.parallel_state.compute_layout` is laxer: it
        accepts a multiple and fills the rest with external data-parallel replicas.
        """
        self.validate()
        if world_size != self.world_size:
            raise ParallelConfigError(
                f"world size {world_size} does not match tensor_parallel_size x token_parallel_size x "
                f"pipeline_parallel_size x data_parallel_size = {self.tensor_parallel_size} x "
                f"{self.token_parallel_size} x {self.pipeline_parallel_size} x {self.data_parallel_size} = "
                f"{self.world_size}; start {self.world_size} ranks (torchrun --nproc-per-node {self.world_size}) "
                f"or change the sizes so that their product is {world_size}."
            )
        return self


# --------------------------------------------------------------------------- serving
SCHEDULE_POLICIES = ("lpm", "fcfs")


@dataclass(frozen=True)
class ServerArgs:
    """Memory, batching and scheduling configuration of RadixAttention serving (SGLang's ``ServerArgs``, trimmed).

    Every rank of a tensor-parallel group must build its scheduler from the *same* arguments: the
    pools are sized from them and rank 0's decisions are replayed on the others.

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
    CPU the same static path runs eagerly. ``attention_backend``: that path's decode attention,
    ``"torch_native"`` (gather + SDPA, any device) or ``"triton"`` (paged kernel, CUDA); ``None``
    picks the device's default (:func:`~hybridpar.models.decode_attention.resolve_attention_backend`).
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
    attention_backend: str | None = None

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
        if self.attention_backend not in (None, "torch_native", "triton"):
            raise ValueError(f"attention_backend must be 'torch_native' or 'triton', got {self.attention_backend!r}")
        if self.new_token_ratio_decay < 0:
            raise ValueError(f"new_token_ratio_decay must be >= 0, got {self.new_token_ratio_decay}")


# Where an engine's ranks come from (hybridpar.engine.executor); "external_launcher" is vLLM's name for "torchrun".
EXECUTOR_BACKENDS = ("mp", "ray", "torchrun", "external_launcher")
RAY_PLACEMENTS = {
    "pack": "one placement group, PACK: fill a node before using the next (Ray's default, vLLM's too)",
    "spread": "one placement group, SPREAD: ranks over as many nodes as possible",
    "tp_per_node": "one STRICT_PACK placement group per TP group: each TP group inside one node, "
                   "TKNP / DP groups across nodes",
}
