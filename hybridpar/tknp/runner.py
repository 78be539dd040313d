"""Bringing up one rank of a TP x TKNP deployment: a root with the model and a scheduler, or an attention worker.

Inside a rank (started by ``hybridpar.launch``, :class:`hybridpar.LLM` or torchrun), for a
:class:`TknpSetup`:

* a **root** (TKNP rank 0) loads its TP shard of the checkpoint and builds the engine's scheduler
  with :func:`build_scheduler`: a :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler` (a paged
  pool and a radix tree per TKNP rank) under token parallelism, else a
  :class:`~hybridpar.radix.scheduler.TPScheduler` (TP, or one DP replica). Its own pool gets what
  its memory budget leaves after the weights;
* a **worker** (TKNP rank > 0) reads only ``config.json``, gives its whole budget to a paged pool
  and becomes an :class:`~hybridpar.tknp.worker.AttentionWorker` (:func:`build_paged_worker`)::

    if is_tknp_root():
        sched = build_scheduler(setup, page_size=16)
        sched.add_request(prompt_ids, max_new_tokens=32)
        results = sched.process_requests()
        sched.shutdown()
    else:
        build_paged_worker(setup, page_size=16).serve()

:class:`hybridpar.engine.EngineWorker` (behind :class:`hybridpar.LLM`) builds its TKNP ranks the
same way; the command line (:mod:`hybridpar.tknp.cli`) and the check (:mod:`hybridpar.tknp.verify`)
call these functions directly, because they report what each rank holds.

Memory model: each rank has ``memory_budget_bytes`` for weights + KV (think: one GPU), counted
in whole pages, page 0 reserved (:func:`~hybridpar.radix.mem_pool.max_tokens_for_budget`). Without
a budget every rank's pool holds ``max_requests_per_rank`` requests of ``max_seq_len`` tokens.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import (
    get_ep_group,
    get_layout,
    get_tknp_group,
    get_tp_group,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from hybridpar.models.sampling import SamplingParams
from hybridpar.radix.mem_pool import max_tokens_for_budget
from hybridpar.radix.scheduler import TPScheduler
from hybridpar.tknp.attention import AttentionGeometry, KVCapacity
from hybridpar.tknp.memory import MemoryPlan, decoder_param_bytes, plan_memory, shape_of
from hybridpar.tknp.radix_scheduler import TknpScheduler, build_paged_worker_backend
from hybridpar.tknp.worker import AttentionWorker


@dataclass(frozen=True, kw_only=True)
class TknpSetup:
    """How to build every rank (picklable: passed to ``launch``). Keyword arguments only.

    ``max_seq_len``: the longest request (prompt + new tokens), the length of a pool row.
    ``max_requests_per_rank``: requests one pool serves at once (its rows); without a budget the
    pool holds ``max_requests_per_rank * max_seq_len`` tokens.
    """

    model_name: str | None = None
    tensor_parallel_size: int = 1
    token_parallel_size: int = 1
    data_parallel_size: int = 1  # independent TP replicas (only without TKNP)
    memory_budget_bytes: int | None = None  # per rank, weights + KV
    max_seq_len: int = 128
    max_requests_per_rank: int = 8
    dtype: str = "float32"
    enable_expert_parallel: bool = False  # MoE models: experts over the EP group (TP x TKNP)

    @property
    def torch_dtype(self) -> torch.dtype:
        from hybridpar.models.model_wrapper import parse_dtype

        return parse_dtype(self.dtype)


@dataclass(frozen=True)
class Workload:
    """Requests served together: prompt token ids, their sampling parameters, and the scheduler step
    at which each arrives (``TPScheduler.add_request``'s arguments)."""

    name: str
    prompts: list[list[int]]
    sampling: list[SamplingParams]
    arrival_steps: list[int]

    def __post_init__(self) -> None:
        if not len(self.prompts) == len(self.sampling) == len(self.arrival_steps):
            raise ValueError(f"workload {self.name!r}: {len(self.prompts)} prompts, {len(self.sampling)} sampling "
                             f"parameters and {len(self.arrival_steps)} arrival steps; give one of each per request")

    def split(self, replicas: int) -> list[Workload]:
        """Round-robin shares of ``replicas`` data-parallel replicas (request ``i`` to replica ``i % replicas``)."""
        return [Workload(self.name, self.prompts[d::replicas], self.sampling[d::replicas], self.arrival_steps[d::replicas])
                for d in range(replicas)]


@dataclass
class RankReport:
    """What one rank holds and did (the command line's per-rank table, :mod:`hybridpar.tknp.cli`).

    ``capacity``: this rank's KV pool; ``capacities``: every rank of its TKNP group (its own alone
    without token parallelism). ``attended_tokens``: new tokens this rank ran attention for (a root
    for the requests placed on its TKNP rank, a TP or DP rank for all of its replica's).
    ``outputs`` (every root): the generated token ids of each request. The leading root of each
    replica also has ``placement`` (the TKNP rank whose pool held each request), ``logits`` (what
    each token was sampled from) and ``passes`` (every forward pass, :class:`PassRecord`).
    """

    rank: int
    tp_rank: int
    tknp_rank: int
    role: str  # "root" or "attention"
    param_bytes: int  # bytes of nn.Parameters of the model on this rank
    parameter_objects: int  # nn.Parameter objects alive in this process (0 on a worker)
    capacity: KVCapacity
    capacities: list[KVCapacity] = field(default_factory=list)
    attended_tokens: int = 0
    outputs: list[list[int]] = field(default_factory=list)
    placement: list[int] = field(default_factory=list)
    logits: list[torch.Tensor | None] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    worker_stats: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parameter_objects_alive() -> int:
    """Number of ``nn.Parameter`` objects alive in this process (after a garbage collection)."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), nn.Parameter))


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


def paged_pool_tokens(setup: TknpSetup, geometry: AttentionGeometry, param_bytes: int, page_size: int) -> int:
    """Tokens of this rank's paged KV pool: what its budget holds after its weights (whole pages, page 0
    reserved), or ``max_requests_per_rank * max_seq_len`` without a budget."""
    if setup.memory_budget_bytes is None:
        return setup.max_requests_per_rank * setup.max_seq_len // page_size * page_size
    return max_tokens_for_budget(max(setup.memory_budget_bytes - param_bytes, 0), geometry.num_layers,
                                 geometry.num_kv_heads, geometry.head_dim, geometry.dtype, page_size)


@dataclass(frozen=True)
class PassRecord:
    """One forward pass as the leading root planned it: request ids, the TKNP rank, cached and new
    tokens and pool row of each (TKNP rank 0 for everything without token parallelism)."""

    rids: list[int]
    tknp_ranks: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    rows: list[int]

    def per_rank(self, num_ranks: int) -> tuple[list[int], list[int], list[int]]:
        """Requests, new tokens and KV tokens (cached + new) of each TKNP rank in this pass."""
        reqs, new, kv = [0] * num_ranks, [0] * num_ranks, [0] * num_ranks
        for r, p, n in zip(self.tknp_ranks, self.prefix_lens, self.extend_lens):
            reqs[r], new[r], kv[r] = reqs[r] + 1, new[r] + n, kv[r] + p + n
        return reqs, new, kv


class RecordingScheduler:
    """Mixin for :class:`TPScheduler` or :class:`TknpScheduler` (:func:`recording`): the leader keeps a
    :class:`PassRecord` of every pass in ``pass_log`` and, in ``sampled_logits[rid]``, the full-vocabulary
    logits (fp32, CPU) every token of request ``rid`` was sampled from. Serving is unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pass_log: list[PassRecord] = []
        self.sampled_logits: dict[int, list[torch.Tensor]] = {}

    def _process_batch_result(self, plan: Any, logits: torch.Tensor | None, results: dict) -> None:
        ranks = getattr(plan, "tknp_ranks", None) or [0] * len(plan.rids)
        self.pass_log.append(PassRecord(list(plan.rids), list(ranks), list(plan.prefix_lens), list(plan.extend_lens),
                                        list(plan.req_pool_indices)))
        if logits is not None:
            for j, row in enumerate(plan.sample_rows):
                self.sampled_logits.setdefault(plan.rids[row], []).append(logits[j].float().cpu())
        super()._process_batch_result(plan, logits, results)  # type: ignore[misc]


@functools.cache
def recording(cls: type[TPScheduler]) -> type[TPScheduler]:
    """``cls`` with :class:`RecordingScheduler` mixed in."""
    return type(f"Recording{cls.__name__}", (RecordingScheduler, cls), {})


def serve_workload(sched: Any, workload: Workload) -> dict[str, Any]:
    """Serve ``workload`` on a recording scheduler (every root, same call). Per request: its id, tokens,
    finish reason, cached prompt tokens, TKNP rank and (leader) logits; ``passes``: the leader's passes
    of this run."""
    first = len(sched.pass_log)
    rids = [sched.add_request(list(ids), sampling=sp, arrival_step=a)
            for ids, sp, a in zip(workload.prompts, workload.sampling, workload.arrival_steps)]
    results = sched.process_requests()
    placement = getattr(sched, "placement", {})
    requests = []
    for rid in rids:
        res, logits = results[rid], sched.sampled_logits.pop(rid, None)
        requests.append({"rid": rid, "tokens": list(res.output_ids), "reason": res.finish_reason, "cached": res.cached_tokens,
                         "rank": placement.get(rid, 0), "logits": None if logits is None else torch.stack(logits)})
    return {"requests": requests, "passes": sched.pass_log[first:]}


def build_scheduler(setup: TknpSetup, page_size: int = 16, record: bool = False, **server_args: Any) -> TPScheduler:
    """This root's scheduler over its TP shard of the model (every root of a TP group, same arguments).

    A :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler` over this rank's TKNP group when
    ``setup.token_parallel_size > 1`` (building it meets the group's workers), else a
    :class:`~hybridpar.radix.scheduler.TPScheduler`. The pool size, rows and context come from
    ``setup`` (:func:`paged_pool_tokens`); ``server_args`` override other
    :class:`~hybridpar.config.ServerArgs` fields (e.g. ``disable_radix_cache=True``).
    ``record``: mix in :class:`RecordingScheduler` (the leader logs every pass and its logits).
    """
    from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper

    ensure_groups(setup)
    tp = get_tp_group()
    ep = get_ep_group() if setup.enable_expert_parallel else None
    wrapper = TPRadixAttentionModelWrapper(setup.model_name, dtype=setup.torch_dtype, tp_group=tp, page_size=page_size,
                                           ep_group=ep)
    param_bytes = sum(p.numel() * p.element_size() for p in wrapper.model.parameters())
    geometry = AttentionGeometry.from_config(wrapper.config, tp.world_size, tp.rank_in_group, setup.torch_dtype)
    sizes = dict(max_total_tokens=paged_pool_tokens(setup, geometry, param_bytes, page_size),
                 max_running_requests=setup.max_requests_per_rank, max_context_len=setup.max_seq_len)
    if setup.token_parallel_size > 1:
        cls = recording(TknpScheduler) if record else TknpScheduler
        return cls(wrapper, get_tknp_group(), **sizes, **server_args)
    return (recording(TPScheduler) if record else TPScheduler)(wrapper, **sizes, **server_args)


def build_tknp_scheduler(setup: TknpSetup, page_size: int = 16, **server_args: Any) -> TknpScheduler:
    """A root's :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler`: paged pool + radix tree per TKNP rank
    (:func:`build_scheduler` under token parallelism)."""
    if setup.token_parallel_size < 2:
        raise ValueError(f"a TknpScheduler needs token_parallel_size >= 2, got {setup.token_parallel_size}; "
                         f"use build_scheduler for TP alone")
    sched = build_scheduler(setup, page_size, **server_args)
    assert isinstance(sched, TknpScheduler)
    return sched


def build_paged_worker(setup: TknpSetup, page_size: int = 16) -> AttentionWorker:
    """An attention worker (a non-root TKNP rank) with a paged pool, for a root running a TknpScheduler.

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
    shard = expert_shard(setup) if setup.enable_expert_parallel else None
    param_bytes = 0 if shard is None else sum(p.numel() * p.element_size() for p in shard.parameters())
    backend, mirror = build_paged_worker_backend(geometry, paged_pool_tokens(setup, geometry, param_bytes, page_size),
                                                 page_size, setup.max_requests_per_rank, setup.max_seq_len, device)
    if shard is not None:
        from hybridpar.tknp.expert_worker import ExpertWorker

        return ExpertWorker(backend, geometry, get_tknp_group(), shard, device, mirror=mirror)
    return AttentionWorker(backend, geometry, get_tknp_group(), device, mirror=mirror)


def expert_shard(setup: TknpSetup) -> nn.Module | None:
    """A non-root rank's experts under expert parallelism (``None`` for a dense model), loaded sharded."""
    from hybridpar.models.config import ModelConfig
    from hybridpar.models.default_checkpoint import resolve_model
    from hybridpar.models.loader import load_checkpoint
    from hybridpar.models.moe import ExpertShard

    path = resolve_model(setup.model_name)
    config = ModelConfig.from_pretrained(path)
    if config.moe is None:
        return None
    with torch.device(current_device()):
        shard = ExpertShard(config, get_tp_group(), get_ep_group(), setup.torch_dtype)
    load_checkpoint(shard, path)
    return shard


def predicted_plan(setup: TknpSetup, page_size: int = 16) -> MemoryPlan:
    """What :func:`hybridpar.tknp.memory.plan_memory` predicts for ``setup``'s ranks: weights, and KV pools
    in whole pages with page 0 reserved (as the engine sizes them)."""
    from hybridpar.models.config import ModelConfig
    from hybridpar.models.default_checkpoint import resolve_model

    config = ModelConfig.from_pretrained(resolve_model(setup.model_name))
    size = torch.empty((), dtype=setup.torch_dtype).element_size()
    return plan_memory(shape_of(config), setup.memory_budget_bytes or 0, tensor_parallel_size=setup.tensor_parallel_size,
                       token_parallel_size=setup.token_parallel_size, data_parallel_size=setup.data_parallel_size,
                       bytes_per_param=size, bytes_per_elem=size, granularity=page_size, reserved_tokens=page_size,
                       param_bytes=decoder_param_bytes(config, setup.tensor_parallel_size, size))


def demo_rank(setup: TknpSetup, per_replica: Sequence[Workload], page_size: int = 16) -> RankReport:
    """Every rank: build it as the engine does and serve this DP replica's workload (``per_replica[0]``
    without DP); a TKNP worker attends until its root releases it. Returns what the rank holds and did."""
    import torch.distributed as dist

    from hybridpar.distributed.communication_op import broadcast_object
    from hybridpar.distributed.parallel_state import get_dp_group
    from hybridpar.tknp.attention import capacity_of

    ensure_groups(setup)
    tknp, tp = get_tknp_group(), get_tp_group()
    base = dict(rank=dist.get_rank(), tp_rank=tp.rank_in_group, tknp_rank=tknp.rank_in_group)
    if not tknp.is_first_rank:
        worker = build_paged_worker(setup, page_size)
        stats = worker.serve()
        return RankReport(**base, role="attention", param_bytes=0, parameter_objects=parameter_objects_alive(),
                          capacity=worker.capacity, capacities=list(worker.capacities),
                          attended_tokens=stats.new_tokens, worker_stats=stats.to_dict())
    sched = build_scheduler(setup, page_size, record=True)
    param_bytes = sum(p.numel() * p.element_size() for p in sched.model.parameters())
    capacities = list(getattr(sched, "capacities", [capacity_of(sched.backend, param_bytes)]))
    try:
        run = serve_workload(sched, per_replica[get_dp_group().rank_in_group])
    finally:
        if isinstance(sched, TknpScheduler):
            sched.shutdown()  # its attention workers return
    # the leader logged the passes; this root attended for the new tokens placed on its TKNP rank (0)
    attended = sum(n for p in run["passes"] for r, n in zip(p.tknp_ranks, p.extend_lens) if r == 0)
    if tp.world_size > 1:
        attended = broadcast_object(attended, src=0, group=tp)
    reqs = run["requests"]
    return RankReport(**base, role="root", param_bytes=param_bytes, parameter_objects=parameter_objects_alive(),
                      capacity=capacities[0], capacities=capacities, attended_tokens=attended,
                      outputs=[o["tokens"] for o in reqs], placement=[o["rank"] for o in reqs] if sched.is_leader else [],
                      logits=[o["logits"] for o in reqs], passes=run["passes"])
