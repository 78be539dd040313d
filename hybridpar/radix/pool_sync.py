"""Keeping the memory pools of every tensor-parallel rank identical: record on rank 0, replay elsewhere.

Rank 0 owns the scheduler and the radix tree; it alone decides which request row and which KV
slots each token gets. The other ranks hold a *mirror* of the two index structures (a
:class:`ReqToTokenPool` and a :class:`TokenToKVPoolAllocator`) plus their own KV buffers, which
store only their KV heads. To keep the mirrors exact, rank 0 builds its pools from the recording
subclasses below: every state change (row alloc/free/write, page alloc/free, including the frees
done by radix-tree eviction and by the request hooks) is appended to a shared op log. The log is
shipped with each step's plan and :func:`replay` applies it, in order, to a follower's mirror.

Replay is *checked*: a follower calls the same allocator method with the same arguments and
raises :class:`PoolDivergenceError` if it gets different rows or slots than rank 0 did. Since
both sides run the same deterministic allocator code, equality is expected; the check turns any
divergence into an immediate error instead of silently wrong attention.

Invariant (tested by comparing :func:`pool_digest` across ranks): after the same plans, every
rank has the same free pages (in the same order), the same free rows, the same ``req_to_token``
table and the same set of written KV slots. A radix-cache hit on rank 0 is therefore a hit on
every rank: the slots it reuses hold that token's K/V shard everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from hybridpar.core import MemoryOp
from hybridpar.radix.mem_pool import ReqToTokenPool, TokenToKVPoolAllocator



class PoolDivergenceError(RuntimeError):
    """A follower's mirror handed out other rows/slots than rank 0's pools: the ranks disagree."""


def _ints(t: torch.Tensor) -> list[int]:
    return t.detach().to("cpu", torch.int64).tolist()


class RecordingReqToTokenPool(ReqToTokenPool):
    """A :class:`ReqToTokenPool` that appends ``rows.alloc`` / ``rows.free`` / ``rows.write`` / ``rows.write_many`` to ``ops``."""

    def __init__(self, size: int, max_context_len: int, device: str | torch.device, ops: list[MemoryOp]) -> None:
        self.ops = ops
        super().__init__(size, max_context_len, device)

    def alloc(self, need_size: int = 1) -> list[int] | None:
        rows = super().alloc(need_size)
        if rows is not None:
            self.ops.append(("rows.alloc", (need_size,), list(rows)))
        return rows

    def free(self, rows: int | Sequence[int]) -> None:
        super().free(rows)
        self.ops.append(("rows.free", ([rows] if isinstance(rows, int) else [int(r) for r in rows],), None))

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        super().write(row, start, slots)
        self.ops.append(("rows.write", (int(row), int(start), _ints(slots)), None))

    def write_many(self, rows: Sequence[int], starts: Sequence[int], lens: Sequence[int], slots: torch.Tensor) -> None:
        super().write_many(rows, starts, lens, slots)
        args = ([int(r) for r in rows], [int(s) for s in starts], [int(n) for n in lens], _ints(slots))
        self.ops.append(("rows.write_many", args, None))


class RecordingTokenToKVPoolAllocator(TokenToKVPoolAllocator):
    """A :class:`TokenToKVPoolAllocator` that appends its outermost public calls to ``ops``.

    Only the outermost call is recorded (``alloc_decode`` delegates to ``alloc_extend``; the
    follower replays the outer call, which repeats the inner one). Frees are recorded as pages.
    """

    def __init__(self, size: int, page_size: int, device: str | torch.device, ops: list[MemoryOp]) -> None:
        self.ops = ops
        self._depth = 0
        super().__init__(size, page_size, device)

    def _call(self, name: str, fn: Any, *args: Any) -> Any:
        self._depth += 1
        try:
            out = fn(*args)
        finally:
            self._depth -= 1
        if self._depth == 0 and out is not None:
            self.ops.append((f"kv.{name}", args, _ints(out)))
        return out

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        return self._call("alloc", super().alloc, int(num_tokens))

    def alloc_extend(self, prefix_lens: Sequence[int], seq_lens: Sequence[int],
                     last_loc: Sequence[int]) -> torch.Tensor | None:
        args = ([int(p) for p in prefix_lens], [int(s) for s in seq_lens], [int(x) for x in last_loc])
        return self._call("alloc_extend", super().alloc_extend, *args)

    def alloc_decode(self, seq_lens: Sequence[int], last_loc: Sequence[int]) -> torch.Tensor | None:
        return self._call("alloc_decode", super().alloc_decode, [int(s) for s in seq_lens], [int(x) for x in last_loc])

    def free(self, indices: torch.Tensor) -> None:
        if indices.numel() == 0:
            return
        pages = sorted(set(_ints(indices.reshape(-1) // self.page_size)))
        super().free(indices)
        self.ops.append(("kv.free", (pages,), None))


def replay(ops: Sequence[MemoryOp], req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator) -> None:
    """Apply rank 0's op log to a follower's mirror pools, checking every allocation result."""
    for name, args, expected in ops:
        if name == "rows.alloc":
            got = req_to_token_pool.alloc(*args)
        elif name == "rows.free":
            req_to_token_pool.free(*args)
            continue
        elif name == "rows.write":
            row, start, slots = args
            req_to_token_pool.write(row, start, torch.tensor(slots, dtype=torch.int64))
            continue
        elif name == "rows.write_many":
            rows, starts, lens, slots = args
            req_to_token_pool.write_many(rows, starts, lens, torch.tensor(slots, dtype=torch.int64))
            continue
        elif name == "kv.free":
            (pages,) = args
            allocator.free(torch.tensor(pages, dtype=torch.int64) * allocator.page_size)
            continue
        elif name in ("kv.alloc", "kv.alloc_extend", "kv.alloc_decode"):
            out = getattr(allocator, name[3:])(*args)
            got = None if out is None else _ints(out)
        else:
            raise ValueError(f"unknown memory op {name!r}")
        if got != expected:
            raise PoolDivergenceError(f"{name}{args}: this rank got {got}, rank 0 got {expected}; "
                                      f"the pools of the tensor-parallel ranks have diverged.")


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def pool_digest(req_to_token_pool: ReqToTokenPool, allocator: TokenToKVPoolAllocator,
                filled: torch.Tensor) -> dict[str, Any]:
    """A small summary of one rank's pool state; equal on every rank of a TP group after a workload.

    ``free_pages``: the allocator's free stack, in order; ``free_rows``: the free request rows;
    ``req_to_token``: hash of the whole table; ``filled``: hash of the written-slot mask and its
    count (KV values themselves differ per rank: each holds other heads).
    """
    return {
        "free_pages": allocator.free_page_ids(),
        "free_rows": sorted(req_to_token_pool.free_slots),
        "req_to_token": _sha(req_to_token_pool.req_to_token),
        "filled": _sha(filled),
        "num_filled": int(filled.sum()),
    }
