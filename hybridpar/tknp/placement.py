"""Which token-parallel rank holds a request's KV cache: balance KV tokens, never move a request.

Attention work grows with the number of cached tokens a query reads, not with the number of
requests: one 4k-token conversation costs as much attention as a hundred 40-token ones. So the
placer balances *KV tokens*. Each request is charged, at admission, the tokens it can reach by
the end of its life (prompt + ``max_new_tokens``): a request that just arrived will grow, and
charging only its current length would pile new work onto the rank that looks emptiest now.

Rules (the invariants the tests check):

* **Least loaded.** A new request goes to the rank with the fewest reserved KV tokens among the
  ranks allowed to take it (ranks with a free slot and room in their pool); ties go to the
  lowest rank index, so placement is deterministic and identical on every root of a TP group.
* **Stable.** A request stays on its rank until :meth:`RequestPlacer.release`; its KV never
  moves between ranks (moving it would mean copying the whole cache across the group).
* **Exact bookkeeping.** ``loads[r]`` is always the sum of the reservations of the live
  requests placed on ``r``.

Greedy least-loaded placement keeps ``max(loads) - min(loads)`` within the largest single
reservation when every rank is allowed (the classic list-scheduling bound), whatever the
arrival order.

Pure Python: no torch, no processes.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


def least_loaded(loads: Sequence[int], allowed: Sequence[bool] | None = None) -> int | None:
    """Index of the smallest load among the allowed ranks (lowest index on ties); ``None`` if none is allowed."""
    best = None
    for rank, load in enumerate(loads):
        if allowed is not None and not allowed[rank]:
            continue
        if best is None or load < loads[best]:
            best = rank
    return best


def place_all(costs: Sequence[int], num_ranks: int) -> list[int]:
    """Greedy placement of requests arriving in ``costs`` order onto empty ranks (a pure helper
    for the book and tests): ``result[i]`` is the rank of request ``i``."""
    placer = RequestPlacer(num_ranks)
    return [placer.place(i, c) for i, c in enumerate(costs)]


@dataclass
class RequestPlacer:
    """Assigns requests to ``num_ranks`` token-parallel ranks by reserved KV tokens.

    ``loads[r]``: KV tokens reserved on rank ``r`` by its live requests. ``assignment``:
    request id -> rank, for the live requests. ``reservations``: request id -> tokens.
    """

    num_ranks: int
    loads: list[int] = field(default_factory=list)
    assignment: dict[Hashable, int] = field(default_factory=dict)
    reservations: dict[Hashable, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.num_ranks, bool) or not isinstance(self.num_ranks, int) or self.num_ranks < 1:
            raise ValueError(f"num_ranks must be an int >= 1, got {self.num_ranks!r}")
        if not self.loads:
            self.loads = [0] * self.num_ranks
        if len(self.loads) != self.num_ranks:
            raise ValueError(f"loads has {len(self.loads)} entries for {self.num_ranks} ranks")

    def place(self, rid: Hashable, kv_tokens: int, allowed: Sequence[bool] | None = None) -> int | None:
        """Place request ``rid`` that may grow to ``kv_tokens`` tokens; return its rank.

        ``allowed[r]`` says whether rank ``r`` can take it now (free slot, enough free KV).
        Returns ``None`` and changes nothing when no rank is allowed: the caller keeps the
        request waiting and tries again after others finish.
        """
        if rid in self.assignment:
            raise ValueError(f"request {rid!r} is already placed on rank {self.assignment[rid]}; "
                             f"placement is fixed for a request's lifetime (release it first)")
        if isinstance(kv_tokens, bool) or not isinstance(kv_tokens, int) or kv_tokens < 1:
            raise ValueError(f"kv_tokens must be an int >= 1 (prompt + max new tokens), got {kv_tokens!r}")
        if allowed is not None and len(allowed) != self.num_ranks:
            raise ValueError(f"allowed has {len(allowed)} entries for {self.num_ranks} ranks")
        rank = least_loaded(self.loads, allowed)
        if rank is None:
            return None
        self.assignment[rid] = rank
        self.reservations[rid] = kv_tokens
        self.loads[rank] += kv_tokens
        return rank

    def rank_of(self, rid: Hashable) -> int:
        """The rank holding live request ``rid``."""
        try:
            return self.assignment[rid]
        except KeyError:
            raise KeyError(f"request {rid!r} is not placed (never placed, or already released)") from None

    def release(self, rid: Hashable) -> int:
        """Forget finished request ``rid``; returns the rank it was on."""
        rank = self.rank_of(rid)
        self.loads[rank] -= self.reservations.pop(rid)
        del self.assignment[rid]
        return rank

    def requests_on(self, rank: int) -> list[Hashable]:
        """Live requests placed on ``rank``, in placement order."""
        return [rid for rid, r in self.assignment.items() if r == rank]

    def check(self) -> None:
        """Raise ``AssertionError`` unless ``loads`` equals the per-rank sum of the reservations."""
        expected = [0] * self.num_ranks
        for rid, rank in self.assignment.items():
            expected[rank] += self.reservations[rid]
        if expected != self.loads or set(self.assignment) != set(self.reservations):
            raise AssertionError(f"placer bookkeeping is inconsistent: loads={self.loads}, expected {expected}")
