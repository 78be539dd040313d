"""StepSync: how one decision on TP rank 0 reaches every rank of the TP group.

Rank 0 (the leader) owns the radix tree and the pools' free lists; the other TP ranks (followers)
hold the same index structures as *mirrors* and never decide. Every change the leader makes to
its pools is recorded (:mod:`hybridpar.radix.pool_sync`); :meth:`StepSync.send` ships the log
with each :class:`~hybridpar.core.StepPlan` in one ``broadcast_object``, and
:meth:`StepSync.receive` replays it on a follower's mirrors before the follower executes the same
plan. So every rank stores its KV heads at the same slots, and a digest of the pools
(:func:`~hybridpar.radix.pool_sync.pool_digest`) is equal on all ranks.

Faults are never sent this way: a rank that fails raises, and the process runner ends the group
(a follower may be inside a collective of the step, where a second collective would hang it).
"""
from __future__ import annotations

import torch

from hybridpar.core import StepPlan
from hybridpar.distributed.communication_op import broadcast_object
from hybridpar.distributed.parallel_state import GroupCoordinator
from hybridpar.radix.mem_pool import ReqToTokenPool, TokenToKVPoolAllocator
from hybridpar.radix.pool_sync import (
    MemoryOp,
    RecordingReqToTokenPool,
    RecordingTokenToKVPoolAllocator,
    replay,
)


class StepSync:
    """The leader/follower protocol of one TP group, and the index pools it keeps in step.

    ``req_to_token_pool`` (rows of ``max_running_requests`` x ``max_context_len`` on ``device``)
    and ``allocator`` (``size`` tokens in pages of ``page_size``, host bookkeeping) record their
    changes on the leader of a group of two or more ranks, and are plain mirrors elsewhere.
    """

    def __init__(self, group: GroupCoordinator, size: int, page_size: int, max_running_requests: int,
                 max_context_len: int, device: torch.device) -> None:
        self.group = group
        self.is_leader = group.rank_in_group == 0
        self.ops: list[MemoryOp] = []
        if self.is_leader and group.world_size > 1:  # followers replay the leader's pool changes
            self.req_to_token_pool: ReqToTokenPool = RecordingReqToTokenPool(
                max_running_requests, max_context_len, device, self.ops)
            self.allocator: TokenToKVPoolAllocator = RecordingTokenToKVPoolAllocator(size, page_size, "cpu", self.ops)
        else:  # the allocator (and so the tree's slot tensors) is host bookkeeping: no device syncs
            self.req_to_token_pool = ReqToTokenPool(max_running_requests, max_context_len, device)
            self.allocator = TokenToKVPoolAllocator(size, page_size, "cpu")

    def send(self, plan: StepPlan) -> None:
        """Leader: attach the pool changes made since the last plan and broadcast the plan."""
        plan.mem_ops = list(self.ops)
        self.ops.clear()
        broadcast_object(plan, src=0, group=self.group)

    def receive(self) -> StepPlan:
        """Follower: the leader's next plan, with its pool changes already replayed here."""
        plan: StepPlan = broadcast_object(None, src=0, group=self.group)
        replay(plan.mem_ops, self.req_to_token_pool, self.allocator)
        return plan
