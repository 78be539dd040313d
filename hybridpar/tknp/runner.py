"""Bringing up one rank of a TP x TKNP deployment: a root with the model, or an attention worker.

Inside a rank (started by ``hybridpar.launch`` or torchrun) after
``initialize_model_parallel(tensor_parallel_size=t, token_parallel_size=k)``:

* a **root** (TKNP rank 0) loads its TP shard of the checkpoint, sizes its own KV cache with
  what its memory budget leaves after the weights, and wraps that cache in a
  :class:`~hybridpar.tknp.attention.TokenParallelAttention` over its TKNP group;
* a **worker** (TKNP rank > 0) reads only ``config.json``, sizes its KV cache with its whole
  budget and becomes an :class:`~hybridpar.tknp.worker.AttentionWorker`.

:func:`serve` does the rest for scripts: the root runs workloads through a
:class:`~hybridpar.tknp.engine.TknpEngine`, then releases the workers, and every rank returns a
:class:`RankReport` (weights held, KV capacity, what it did).

RadixAttention serving uses the paged variants: roots build a
:class:`~hybridpar.tknp.radix_scheduler.TknpScheduler` with :func:`build_tknp_scheduler` (add
requests, ``process_requests()``, ``shutdown()``), workers build :func:`build_paged_worker` and
call ``serve()``::

    if is_tknp_root():
        sched = build_tknp_scheduler(setup, page_size=16)
        sched.add_request(prompt_ids, max_new_tokens=32)
        results = sched.process_requests()
        sched.shutdown()
    else:
        build_paged_worker(setup, page_size=16).serve()

Memory model: each rank has ``memory_budget_bytes`` for weights + KV (think: one GPU). Without a
budget every rank gets ``max_requests_per_rank`` rows. A contiguous cache row holds
``max_seq_len`` tokens, so capacity comes in rows.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import (
    get_layout,
    get_tknp_group,
    get_tp_group,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from hybridpar.models.attention_backend import ContiguousKVCache
from hybridpar.radix.mem_pool import kv_bytes_per_token, max_tokens_for_budget
from hybridpar.tknp.attention import AttentionGeometry, KVCapacity, TokenParallelAttention
from hybridpar.tknp.engine import Request, RequestOutput, TknpEngine
from hybridpar.tknp.memory import rank_kv_tokens
from hybridpar.tknp.radix_scheduler import TknpScheduler, build_paged_worker_backend
from hybridpar.tknp.worker import AttentionWorker


@dataclass(frozen=True, kw_only=True)
class TknpSetup:
    """How to build every rank (picklable: passed to ``launch``). Keyword arguments only."""

    model_name: str | None = None
    tensor_parallel_size: int = 1
    token_parallel_size: int = 1
    data_parallel_size: int = 1  # independent TP replicas (only without TKNP)
    memory_budget_bytes: int | None = None  # per rank, weights + KV
    max_seq_len: int = 128
    max_requests_per_rank: int = 8  # cache rows per rank when there is no budget
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        from hybridpar.models.model_wrapper import parse_dtype

        return parse_dtype(self.dtype)


@dataclass
class Workload:
    """Requests to serve in one engine run (a scenario)."""

    name: str
    requests: list[Request]
    return_logits: bool = False


@dataclass
class RankReport:
    """What one rank holds and did (returned to the parent by :func:`serve`)."""

    rank: int
    tp_rank: int
    tknp_rank: int
    role: str  # "root" or "attention"
    param_bytes: int  # bytes of nn.Parameters of the model on this rank
    parameter_objects: int  # nn.Parameter objects alive in this process (0 on a worker)
    capacity: KVCapacity
    capacities: list[KVCapacity] = field(default_factory=list)  # every rank of the TKNP group
    outputs: dict[str, list[RequestOutput]] = field(default_factory=dict)  # roots: per workload
    history: dict[str, list[Any]] = field(default_factory=dict)  # roots: per-step records
    worker_stats: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parameter_objects_alive() -> int:
    """Number of ``nn.Parameter`` objects alive in this process (after a garbage collection)."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), nn.Parameter))


def cache_rows(setup: TknpSetup, geometry: AttentionGeometry, param_bytes: int) -> int:
    """Rows of ``max_seq_len`` tokens this rank's KV cache gets (from its budget left after weights)."""
    if setup.memory_budget_bytes is None:
        return setup.max_requests_per_rank
    per_token = kv_bytes_per_token(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim, geometry.dtype)
    tokens = rank_kv_tokens(setup.memory_budget_bytes, param_bytes, per_token, granularity=setup.max_seq_len)
    return tokens // setup.max_seq_len


def ensure_groups(setup: TknpSetup) -> None:
    """Initialise TP x TKNP process groups for ``setup`` unless already initialised (checks they match)."""
    sizes = dict(tensor_parallel_size=setup.tensor_parallel_size, token_parallel_size=setup.token_parallel_size,
                 data_parallel_size=setup.data_parallel_size)
    if not model_parallel_is_initialized():
        initialize_model_parallel(**sizes)
    layout = get_layout()
    have = {name: getattr(layout, name) for name in sizes}
    if have != sizes:
        raise ValueError(f"process groups were initialised with {have} but the setup asks for {sizes}; "
                         f"call destroy_model_parallel() first or build the setup with the same sizes")


class TknpRoot:
    """The model, tokenizer and token-parallel attention of a root rank."""

    def __init__(self, setup: TknpSetup) -> None:
        from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper

        ensure_groups(setup)
        self.setup = setup
        self.wrapper = TPRadixAttentionModelWrapper(setup.model_name, dtype=setup.torch_dtype, tp_group=get_tp_group())
        self.model = self.wrapper.model
        self.param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        tp = get_tp_group()
        self.geometry = AttentionGeometry.from_config(self.model.config, tp.world_size, tp.rank_in_group,
                                                      setup.torch_dtype)
        rows = cache_rows(setup, self.geometry, self.param_bytes)
        cache = ContiguousKVCache(self.geometry.num_layers, self.geometry.num_kv_heads, self.geometry.head_dim,
                                  rows, setup.max_seq_len, dtype=setup.torch_dtype, device=self.wrapper.device)
        self.attn = TokenParallelAttention(cache, get_tknp_group(), self.geometry, self.param_bytes)

    def engine(self, return_logits: bool = False) -> TknpEngine:
        return TknpEngine(self.model, self.attn, return_logits=return_logits)

    def shutdown(self) -> None:
        self.attn.shutdown()


def build_worker(setup: TknpSetup) -> AttentionWorker:
    """An attention worker for this (non-root) rank: config.json only, the whole budget for KV.

    The shape comes from ``config.json`` as plain JSON (:class:`~hybridpar.roofline.ModelShape`):
    a worker imports neither transformers nor the model code's weights path.
    """
    from hybridpar.models.default_checkpoint import resolve_model
    from hybridpar.roofline import ModelShape

    ensure_groups(setup)
    config = ModelShape.from_hf_config(resolve_model(setup.model_name) / "config.json")
    tp = get_tp_group()
    geometry = AttentionGeometry.from_config(config, tp.world_size, tp.rank_in_group, setup.torch_dtype)
    device = current_device()
    cache = ContiguousKVCache(geometry.num_layers, geometry.num_kv_heads, geometry.head_dim,
                              cache_rows(setup, geometry, 0), setup.max_seq_len, dtype=setup.torch_dtype,
                              device=device)
    return AttentionWorker(cache, geometry, get_tknp_group(), device)


def paged_pool_tokens(setup: TknpSetup, geometry: AttentionGeometry, param_bytes: int, page_size: int) -> int:
    """Tokens of this rank's paged KV pool: what its budget holds after its weights (whole pages, page 0
    reserved), or ``max_requests_per_rank * max_seq_len`` without a budget."""
    if setup.memory_budget_bytes is None:
        return setup.max_requests_per_rank * setup.max_seq_len // page_size * page_size
    return max_tokens_for_budget(max(setup.memory_budget_bytes - param_bytes, 0), geometry.num_layers,
                                 geometry.num_kv_heads, geometry.head_dim, geometry.dtype, page_size)


def build_tknp_scheduler(setup: TknpSetup, page_size: int = 16, **server_args: Any) -> TknpScheduler:
    """A root's :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler`: paged pool + radix tree per TKNP rank.

    ``server_args`` override :class:`~hybridpar.radix.server_args.ServerArgs` fields (e.g.
    ``disable_radix_cache=True``); the pool size, rows and context come from ``setup``.
    """
    from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper

    ensure_groups(setup)
    tp = get_tp_group()
    wrapper = TPRadixAttentionModelWrapper(setup.model_name, dtype=setup.torch_dtype, tp_group=tp, page_size=page_size)
    param_bytes = sum(p.numel() * p.element_size() for p in wrapper.model.parameters())
    geometry = AttentionGeometry.from_config(wrapper.config, tp.world_size, tp.rank_in_group, setup.torch_dtype)
    tokens = paged_pool_tokens(setup, geometry, param_bytes, page_size)
    return TknpScheduler(wrapper, get_tknp_group(), max_total_tokens=tokens,
                         max_running_requests=setup.max_requests_per_rank, max_context_len=setup.max_seq_len,
                         **server_args)


def build_paged_worker(setup: TknpSetup, page_size: int = 16) -> AttentionWorker:
    """A worker with a paged pool (for a root running :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler`)."""
    from hybridpar.models.default_checkpoint import resolve_model
    from hybridpar.roofline import ModelShape

    ensure_groups(setup)
    config = ModelShape.from_hf_config(resolve_model(setup.model_name) / "config.json")
    tp = get_tp_group()
    geometry = AttentionGeometry.from_config(config, tp.world_size, tp.rank_in_group, setup.torch_dtype)
    device = current_device()
    backend, mirror = build_paged_worker_backend(geometry, paged_pool_tokens(setup, geometry, 0, page_size), page_size,
                                                 setup.max_requests_per_rank, setup.max_seq_len, device)
    return AttentionWorker(backend, geometry, get_tknp_group(), device, mirror=mirror)


def serve(setup: TknpSetup, workloads: Sequence[Workload]) -> RankReport:
    """Run on every rank: roots serve ``workloads`` in order, workers serve attention until released."""
    ensure_groups(setup)
    tknp, tp = get_tknp_group(), get_tp_group()
    base = dict(rank=tknp.rank, tp_rank=tp.rank_in_group, tknp_rank=tknp.rank_in_group)
    if tknp.is_first_rank:
        root = TknpRoot(setup)
        report = RankReport(**base, role="root", param_bytes=root.param_bytes, parameter_objects=0,
                            capacity=root.attn.capacities[0], capacities=list(root.attn.capacities))
        try:
            for workload in workloads:
                engine = root.engine(workload.return_logits)
                report.outputs[workload.name] = engine.run(workload.requests)
                report.history[workload.name] = engine.history
        finally:
            root.shutdown()
        report.parameter_objects = parameter_objects_alive()
        return report
    worker = build_worker(setup)
    stats = worker.serve()
    return RankReport(**base, role="attention", param_bytes=0, parameter_objects=parameter_objects_alive(),
                      capacity=worker.capacity, capacities=list(worker.capacities), worker_stats=stats.to_dict())
