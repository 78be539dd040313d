"""TokenParallelAttention: the root's attention backend that spreads a batch over a TKNP group.

The model on a TKNP root is the ordinary (tensor-parallel) decoder; only its attention backend
changes. Each layer hands ``forward_batch.attn_backend.forward(layer, q, k, v, fb)`` the Q, K, V
of *every* request of the batch. :class:`TokenParallelAttention` then

1. regroups the tokens by the TKNP rank that owns each request (``fb.tknp_ranks``),
2. packs ``[q | k | v]`` along the head axis and ``scatterv``-s the variable-size pieces over
   the TKNP group (requests differ in length, so the pieces differ in size),
3. runs its own piece through its local backend (the root's own KV cache) while every other
   rank does the same in an :class:`~hybridpar.tknp.worker.AttentionWorker`,
4. ``gatherv``-s the outputs back to the root and restores the batch's token order.

Once per forward pass, before the first layer, :meth:`~TokenParallelAttention.init_forward_metadata`
broadcasts a :class:`PassPlan`: each rank's sub-batch (its cache rows, prefix and new-token
counts, and for a paged cache its slots), so every rank can build its own
:class:`~hybridpar.models.attention_backend.ForwardBatch` and knows the split sizes of every
scatter and gather of this pass.

Under TP x TKNP every root is one rank of the roots' TP group and holds its TP share of the
heads; it scatters that share to its own TKNP group, whose ranks have the same TP rank and so
hold the same share of KV heads. All roots run the same scheduler and so send the same plan.

With a group of one rank (or ``group=None``) the wrapper calls the local backend directly,
without a copy: disabling token parallelism gives exactly the standard attention.

Costs. Per layer the root sends ``(T - T_root) * (Hq + 2 Hkv) * d`` elements and receives
``(T - T_root) * Hq * d``, where ``T_root`` are the new tokens of its own requests; per pass one
pickled plan goes out over the gloo side group. ``scatterv``/``gatherv`` pad every piece to the
largest one (the collectives move equal-sized buffers), so an uneven split costs bandwidth even
when it balances the attention work. Nothing here overlaps communication with computation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from hybridpar.distributed.communication_op import broadcast_object, gatherv, scatterv
from hybridpar.distributed.parallel_state import GroupCoordinator
from hybridpar.models.attention_backend import AttentionBackend, ContiguousKVCache, ForwardBatch


@dataclass
class TknpForwardBatch(ForwardBatch):
    """A :class:`ForwardBatch` that also says which TKNP rank owns each request.

    ``tknp_ranks[i]`` is the rank whose KV cache holds request ``i``; ``req_pool_indices[i]`` (and,
    for paged caches, the slots in ``out_cache_loc``) index *that rank's* cache.
    """

    tknp_ranks: list[int] | None = None
    rank_mem_ops: list[list] | None = None  # paged caches: pool changes rank j replays before attending

    @classmethod
    def build_placed(cls, attn_backend: AttentionBackend, tknp_ranks: Sequence[int], req_pool_indices: Sequence[int],
                     prefix_lens: Sequence[int], extend_seq_lens: Sequence[int], device: torch.device | str = "cpu",
                     out_cache_loc: torch.Tensor | None = None) -> TknpForwardBatch:
        fb = cls.build(attn_backend, req_pool_indices, prefix_lens, extend_seq_lens, device, out_cache_loc)
        if len(tknp_ranks) != fb.batch_size:
            raise ValueError(f"{len(tknp_ranks)} tknp_ranks for {fb.batch_size} requests")
        fb.tknp_ranks = [int(r) for r in tknp_ranks]
        return fb


@dataclass(frozen=True)
class AttentionGeometry:
    """Shape of the attention one rank computes: its TP share of the heads, for every layer."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_config(cls, config: object, tp_size: int = 1, tp_rank: int = 0,
                    dtype: torch.dtype = torch.float32) -> AttentionGeometry:
        """The heads TP rank ``tp_rank`` holds (the same rule as ``QKVParallelLinear``)."""
        from hybridpar.layers.linear import qkv_partition

        part = qkv_partition(config.num_heads, config.num_kv_heads, tp_size, tp_rank)
        return cls(config.num_layers, part.num_heads, part.num_kv_heads, config.head_dim, dtype)

    @property
    def packed_heads(self) -> int:
        """Heads of a packed ``[q | k | v]`` token: ``Hq + 2 Hkv``."""
        return self.num_heads + 2 * self.num_kv_heads


@dataclass(frozen=True)
class KVCapacity:
    """What one TKNP rank can hold, reported to the root when the group starts."""

    num_slots: int  # requests it can hold at once (cache rows)
    max_seq_len: int  # longest request it can hold
    num_tokens: int  # KV tokens of its cache
    kv_bytes: int  # bytes of its K/V buffers
    param_bytes: int = 0  # bytes of model weights on the rank (0 on attention-only ranks)


def capacity_of(backend: AttentionBackend, param_bytes: int = 0) -> KVCapacity:
    """The :class:`KVCapacity` of a local backend (contiguous rows, or a paged pool)."""
    from hybridpar.radix.paged_backend import RadixAttentionBackend

    if isinstance(backend, ContiguousKVCache):
        return KVCapacity(backend.max_batch_size, backend.max_seq_len, backend.max_batch_size * backend.max_seq_len,
                          backend.size_bytes(), param_bytes)
    if isinstance(backend, RadixAttentionBackend):
        rows, kv = backend.req_to_token_pool, backend.token_to_kv_pool
        return KVCapacity(rows.size, rows.max_context_len, kv.size, kv.kv_size_bytes(), param_bytes)
    raise TypeError(f"token parallelism does not know how to size a {type(backend).__name__}; "
                    f"use a ContiguousKVCache or a RadixAttentionBackend")


@dataclass
class SubBatch:
    """The requests of one TKNP rank in one forward pass, in batch order, indexing that rank's cache."""

    req_pool_indices: list[int] = field(default_factory=list)
    prefix_lens: list[int] = field(default_factory=list)
    extend_lens: list[int] = field(default_factory=list)
    out_cache_loc: torch.Tensor | None = None  # CPU int64 slots of the new tokens (paged caches)
    mem_ops: list | None = None  # paged caches: the root's pool changes to replay on this rank's mirror first

    @property
    def num_tokens(self) -> int:
        return sum(self.extend_lens)

    def forward_batch(self, backend: AttentionBackend, device: torch.device) -> ForwardBatch | None:
        """This rank's own ForwardBatch, or ``None`` if it has no request in this pass."""
        if not self.req_pool_indices:
            return None
        loc = None if self.out_cache_loc is None else self.out_cache_loc.to(device)
        return ForwardBatch.build(backend, self.req_pool_indices, self.prefix_lens, self.extend_lens, device, loc)


@dataclass
class PassPlan:
    """What every rank of a TKNP group needs for one forward pass: one sub-batch per rank.

    (Not to be confused with the TP scheduler's ``StepPlan``, which a TP leader sends to its TP
    followers; a TKNP root sends a ``PassPlan`` to its attention workers.)
    """

    sub_batches: list[SubBatch]

    @property
    def split_sizes(self) -> list[int]:
        """New tokens per rank: the sizes of every scatterv / gatherv of this pass."""
        return [sb.num_tokens for sb in self.sub_batches]


def split_batch(fb: ForwardBatch, num_ranks: int) -> tuple[PassPlan, torch.Tensor]:
    """Split a placed batch by owner rank (pure).

    Returns the plan and ``order``: ``order[j]`` is the batch-token index of the ``j``-th token in
    rank-grouped order (rank 0's requests first, each rank's requests in batch order), so
    ``x[order]`` groups tokens for ``scatterv`` and ``y[order] = grouped`` restores them.
    """
    ranks = getattr(fb, "tknp_ranks", None)
    if ranks is None or len(ranks) != fb.batch_size:
        raise ValueError("TokenParallelAttention needs a TknpForwardBatch whose tknp_ranks names the TKNP rank "
                         "of every request (build it with TknpForwardBatch.build_placed)")
    if any(not 0 <= r < num_ranks for r in ranks):
        raise ValueError(f"tknp_ranks {ranks} must lie in [0, {num_ranks})")
    starts = [0]
    for n in fb.extend_seq_lens:
        starts.append(starts[-1] + n)
    subs = [SubBatch() for _ in range(num_ranks)]
    pieces: list[list[torch.Tensor]] = [[] for _ in range(num_ranks)]
    loc = None if fb.out_cache_loc is None else fb.out_cache_loc.detach().to("cpu", torch.int64)
    for i, rank in enumerate(ranks):
        sb = subs[rank]
        sb.req_pool_indices.append(fb.req_pool_indices[i])
        sb.prefix_lens.append(fb.seq_lens[i] - fb.extend_seq_lens[i])
        sb.extend_lens.append(fb.extend_seq_lens[i])
        pieces[rank].append(torch.arange(starts[i], starts[i + 1]))
    if loc is not None:
        for rank, sb in enumerate(subs):
            sb.out_cache_loc = loc[torch.cat(pieces[rank])] if pieces[rank] else loc.new_empty(0)
    for rank, ops in enumerate(getattr(fb, "rank_mem_ops", None) or []):
        subs[rank].mem_ops = ops or None
    order = torch.cat([p for rank_pieces in pieces for p in rank_pieces])
    return PassPlan(subs), order


def attend_piece(backend: AttentionBackend, layer_id: int, packed: torch.Tensor, geometry: AttentionGeometry,
                 fb: ForwardBatch | None) -> torch.Tensor:
    """Unpack ``[q | k | v]`` of this rank's tokens and run its backend; ``o [n, Hq, d]`` (empty if ``n == 0``)."""
    if fb is None:
        return packed.new_empty(0, geometry.num_heads, geometry.head_dim)
    q, k, v = packed.split([geometry.num_heads, geometry.num_kv_heads, geometry.num_kv_heads], dim=1)
    return backend.forward(layer_id, q, k, v, fb)


def exchange_hello(group: GroupCoordinator, geometry: AttentionGeometry, capacity: KVCapacity) -> list[KVCapacity]:
    """Collective start of a TKNP group: every rank learns every rank's capacity; geometries must agree."""
    hellos: list[tuple[AttentionGeometry, KVCapacity] | None] = [None] * group.world_size
    dist.all_gather_object(hellos, (geometry, capacity), group=group.cpu_group)
    mismatched = [i for i, (g, _) in enumerate(hellos) if g != geometry]
    if mismatched:
        raise RuntimeError(f"TKNP group {group.ranks}: group ranks {mismatched} compute attention of shape "
                           f"{hellos[mismatched[0]][0]}, this rank {geometry}; every rank of a TKNP group must "
                           f"be built from the same model config, dtype and TP rank")
    return [c for _, c in hellos]


class TokenParallelAttention(AttentionBackend):
    """Root-side backend: scatter each layer's Q/K/V by request over ``group``, attend, gather back.

    ``local``: the root's own cache (serves the requests placed on TKNP rank 0). ``group``: the
    TKNP group, this rank being its rank 0; ``None`` or a one-rank group disables token
    parallelism (exact fallback to ``local``). Constructing it is collective over ``group``
    (every other rank constructs an :class:`~hybridpar.tknp.worker.AttentionWorker`);
    afterwards ``capacities[r]`` is rank ``r``'s :class:`KVCapacity`. Call :meth:`shutdown` when
    done, so the workers return.
    """

    def __init__(self, local: AttentionBackend, group: GroupCoordinator | None, geometry: AttentionGeometry,
                 param_bytes: int = 0) -> None:
        self.local = local
        self.geometry = geometry
        self.group = group if group is not None and group.world_size > 1 else None
        self.closed = False
        own = capacity_of(local, param_bytes)
        if self.group is None:
            self.capacities = [own]
            return
        if not self.group.is_first_rank:
            raise ValueError(f"TokenParallelAttention runs on the TKNP root (group rank 0); this is group rank "
                             f"{self.group.rank_in_group}: build an AttentionWorker there instead")
        self.capacities = exchange_hello(self.group, geometry, own)
        self._plan: PassPlan | None = None
        self._order = torch.empty(0, dtype=torch.long)
        self._local_fb: ForwardBatch | None = None

    @property
    def num_ranks(self) -> int:
        return len(self.capacities)

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        if self.group is None:
            self.local.init_forward_metadata(forward_batch)
            return
        if self.closed:
            raise RuntimeError("this TokenParallelAttention was shut down; its attention workers have returned")
        plan, order = split_batch(forward_batch, self.num_ranks)
        broadcast_object(plan, src=0, group=self.group)
        self._plan, self._order = plan, order.to(forward_batch.positions.device)
        self._local_fb = plan.sub_batches[0].forward_batch(self.local, forward_batch.positions.device)
        if self._local_fb is not None:
            self.local.init_forward_metadata(self._local_fb)

    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        if self.group is None:
            return self.local.forward(layer_id, q, k, v, forward_batch)
        if self._plan is None:
            raise RuntimeError("TokenParallelAttention.forward before init_forward_metadata: run the model's "
                               "forward (it calls init_forward_metadata once per pass)")
        sizes = self._plan.split_sizes
        packed = torch.cat([q, k, v], dim=1)[self._order]
        mine = scatterv(packed, sizes, src=0, dim=0, group=self.group)
        o_mine = attend_piece(self.local, layer_id, mine, self.geometry, self._local_fb)
        grouped = gatherv(o_mine, sizes, dst=0, dim=0, group=self.group)
        out = torch.empty_like(grouped)
        out[self._order] = grouped
        return out

    def sync(self, rank_mem_ops: Sequence[list]) -> None:
        """Send pool changes to the workers without a forward pass (a plan with no tokens).

        A paged root records every change to the index pools it keeps for each rank and ships them
        with the next pass; call this when no pass follows (e.g. the frees of the last finished
        requests) so that every worker's mirror is current.
        """
        if self.group is None or not any(rank_mem_ops):
            return
        plan = PassPlan([SubBatch(mem_ops=list(ops) or None) for ops in rank_mem_ops])
        broadcast_object(plan, src=0, group=self.group)

    def release(self) -> None:
        """Let the attention workers' ``serve()`` return; they keep their KV and may serve again."""
        if self.group is not None and not self.closed:
            broadcast_object(None, src=0, group=self.group)

    def shutdown(self) -> None:
        """Tell the attention workers of the group to return for good (collective; idempotent on the root)."""
        self.release()
        self.closed = True
