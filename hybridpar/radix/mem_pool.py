"""Token memory for RadixAttention: request rows, a paged slot allocator, per-layer KV buffers.

SGLang addresses the KV cache through two levels of integer indices::

    req_to_token[req_pool_idx, pos] = slot          # ReqToTokenPool (one row per live request)
    k_buffer[layer][slot], v_buffer[layer][slot]    # MHATokenToKVPool (one entry per token)

Slots are handed out by :class:`TokenToKVPoolAllocator` in *pages* of ``page_size``
consecutive slots: page ``p`` owns slots ``[p * page_size, (p + 1) * page_size)``.

Invariants (checked by :meth:`hybridpar.radix.radix_cache.RadixCache.check_integrity`):

* Page 0 is reserved and never allocated. Its slots are a harmless write target for
  padded tokens (a padded batch writes its dummy K/V to slot 0), as in SGLang. A pool
  built for ``size`` tokens therefore has ``size // page_size + 1`` pages of storage.
* Position ``pos`` of a request lives at offset ``pos % page_size`` of the request's
  ``pos // page_size``-th page, so a row is fully described by its page list
  ``row[::page_size] // page_size`` (the "block table" of paged-attention kernels).
* Every page is in exactly one state: free, owned by the radix tree, or owned by one
  request. Freeing any slot of a page frees the whole page; freeing a free page raises.

Under tensor parallelism each rank builds its own pools; the KV buffers hold only this
rank's KV heads (``head_num`` = KV heads per rank), the index structures are identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hybridpar.roofline import kv_token_bytes


def num_usable_pages(size: int, page_size: int) -> int:
    """Number of allocatable pages of a pool meant to hold ``size`` tokens (page 0 excluded)."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an int >= 1, got {page_size!r}; 16 is the usual choice.")
    if isinstance(size, bool) or not isinstance(size, int) or size < page_size:
        raise ValueError(
            f"size must be an int >= page_size={page_size}, got {size!r}; "
            f"give the pool room for at least one page of tokens."
        )
    return size // page_size


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the KV cache of one rank: K and V, every layer (in ``dtype``)."""
    return int(kv_token_bytes(num_layers, num_kv_heads, head_dim, torch.empty((), dtype=dtype).element_size()))


def max_tokens_for_budget(
    budget_bytes: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    page_size: int = 16,
) -> int:
    """Largest ``size`` (in tokens, whole pages) whose :class:`MHATokenToKVPool` fits ``budget_bytes``.

    The reserved page 0 is paid for out of the budget. Returns 0 when not even one usable
    page fits. With tensor parallelism pass the KV heads *per rank*: halving them doubles
    the number of tokens a rank can cache.
    """
    slots = budget_bytes // kv_bytes_per_token(num_layers, num_kv_heads, head_dim, dtype)
    return max(slots // page_size - 1, 0) * page_size


def pool_tokens(args: Any, config: Any, num_kv_heads: int, dtype: torch.dtype, device: torch.device,
                group: Any) -> int:
    """KV-pool size in tokens of one TP group's ranks, from :class:`~hybridpar.config.ServerArgs` ``args``.

    ``args.max_total_tokens`` if set (whole pages); else what the memory holds: on a GPU the free
    memory minus ``(1 - mem_fraction_static)`` of the device, on the CPU ``cpu_kv_cache_bytes``; the
    ranks of ``group`` agree on the minimum (a collective). ``num_kv_heads``: per rank.
    """
    if args.max_total_tokens is not None:
        tokens = args.max_total_tokens // args.page_size * args.page_size
    else:
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            budget = int(free - (1.0 - args.mem_fraction_static) * total)
        else:
            budget = args.cpu_kv_cache_bytes
        tokens = max_tokens_for_budget(max(budget, 0), config.num_layers, num_kv_heads, config.head_dim, dtype,
                                       args.page_size)
        if group.world_size > 1:
            t = torch.tensor([tokens], dtype=torch.int64)
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group.cpu_group)
            tokens = int(t)
    if tokens < args.page_size:
        per_token = kv_bytes_per_token(config.num_layers, num_kv_heads, config.head_dim, dtype)
        raise ValueError(f"no room for a KV cache ({per_token} bytes per token per rank): pass max_total_tokens=, "
                         f"raise mem_fraction_static / cpu_kv_cache_bytes, or use more TP ranks")
    return tokens


class ReqToTokenPool:
    """One row of slot indices per live request: ``req_to_token[req_pool_idx, pos] = slot``.

    ``req_to_token`` is an int32 tensor ``[size, max_context_len]`` on ``device`` (attention
    kernels read it there). Rows are handed out by :meth:`alloc` and returned by :meth:`free`; a
    row's content is only meaningful in positions ``[0, req.kv_len)`` of the request that holds
    it. ``host`` is the same table in CPU memory (the very tensor on a CPU pool; pinned beside a
    GPU pool): every write goes to both, the device copy queued without a sync, and the
    scheduler's bookkeeping (:meth:`read`) reads the host copy, so it never waits for the device.
    """

    def __init__(self, size: int, max_context_len: int, device: str | torch.device = "cpu") -> None:
        if size < 1 or max_context_len < 1:
            raise ValueError(
                f"ReqToTokenPool needs size >= 1 and max_context_len >= 1, got {size}, {max_context_len}; "
                f"size is the maximum number of running requests."
            )
        self.size = size
        self.max_context_len = max_context_len
        self.device = torch.device(device)
        self.req_to_token = torch.zeros((size, max_context_len), dtype=torch.int32, device=self.device)
        cpu = self.device.type == "cpu"
        # pinned, so that a write's copy to the device is queued on the stream without waiting for it
        self.host = self.req_to_token if cpu else torch.zeros((size, max_context_len), dtype=torch.int32,
                                                              pin_memory=True)
        self._host_np = self.host.numpy()  # the same memory; numpy indexes small slices faster than torch
        self.clear()

    def clear(self) -> None:
        """Return every row to the free list (the table content is left as is)."""
        self.free_slots: list[int] = list(range(self.size))
        self._is_free = [True] * self.size

    def available_size(self) -> int:
        return len(self.free_slots)

    def alloc(self, need_size: int = 1) -> list[int] | None:
        """Take ``need_size`` rows, or return ``None`` (and take nothing) if too few are free."""
        if need_size > len(self.free_slots):
            return None
        rows = self.free_slots[:need_size]
        self.free_slots = self.free_slots[need_size:]
        for r in rows:
            self._is_free[r] = False
        return rows

    def free(self, rows: int | Sequence[int]) -> None:
        """Return rows to the free list; freeing a row that is already free raises ValueError."""
        rows = [rows] if isinstance(rows, int) else [int(r) for r in rows]
        for r in rows:
            if not 0 <= r < self.size or self._is_free[r]:
                raise ValueError(f"req_to_token row {r} is not allocated (double free or out of range 0..{self.size - 1}).")
        for r in rows:
            self._is_free[r] = True
        self.free_slots.extend(rows)

    def is_free(self, row: int) -> bool:
        return self._is_free[row]

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        """``req_to_token[row, start:start + len(slots)] = slots``."""
        end = start + len(slots)
        self._check_end(end)
        self._host_np[row, start:end] = slots.detach().to("cpu").numpy()
        if self.host is not self.req_to_token:  # asynchronous: the host never waits for the GPU here
            self.req_to_token[row, start:end].copy_(self.host[row, start:end], non_blocking=True)

    def write_many(self, rows: Sequence[int], starts: Sequence[int], lens: Sequence[int], slots: torch.Tensor) -> None:
        """:meth:`write` for several rows in one indexed copy: row ``rows[i]`` gets the next ``lens[i]``
        entries of ``slots`` at ``starts[i]`` (a decode step writes one slot in each running row)."""
        for start, n in zip(starts, lens, strict=True):
            self._check_end(start + n)
        row_idx = [r for r, n in zip(rows, lens) for _ in range(n)]
        col_idx = [s + j for s, n in zip(starts, lens) for j in range(n)]
        if len(row_idx) != len(slots):
            raise ValueError(f"write_many got {len(slots)} slots for {len(row_idx)} positions")
        index = torch.tensor([row_idx, col_idx], dtype=torch.int64)
        values = slots.to("cpu", torch.int32)
        self.host[index[0], index[1]] = values
        if self.host is not self.req_to_token:
            index, values = index.to(self.device), values.to(self.device)
            self.req_to_token[index[0], index[1]] = values

    def read(self, row: int, n: int) -> torch.Tensor:
        """Positions ``[0, n)`` of ``row`` as int64 slots, from the host copy (no device sync)."""
        return torch.from_numpy(self.read_numpy(row, n))

    def read_numpy(self, row: int, n: int, start: int = 0) -> np.ndarray:
        """Positions ``[start, n)`` as a fresh int64 numpy array (for host bookkeeping that slices it)."""
        return self._host_np[row, start:n].astype(np.int64)

    def _check_end(self, end: int) -> None:
        if end > self.max_context_len:
            raise ValueError(
                f"request needs {end} positions but max_context_len={self.max_context_len}; "
                f"build the ReqToTokenPool with a larger max_context_len or shorten the request."
            )


class TokenToKVPoolAllocator:
    """Free list of KV-cache pages; hands out slot indices, always in whole pages.

    ``size`` tokens of capacity means ``size // page_size`` allocatable pages, numbered
    ``1 .. num_pages`` (page 0 is reserved, see the module docstring). All index tensors
    returned are int64 on ``device``. Allocation either succeeds completely or returns
    ``None`` and changes nothing, so the caller can evict from the radix cache and retry.
    """

    def __init__(self, size: int, page_size: int = 16, device: str | torch.device = "cpu") -> None:
        self.page_size = page_size
        self.num_pages = num_usable_pages(size, page_size)
        self.size = self.num_pages * page_size
        self.device = torch.device(device)
        self.clear()

    def clear(self) -> None:
        """Mark every page free again. Pages are handed out in ascending order after a clear."""
        # A stack: the next page handed out is the last element.
        self._free_pages: list[int] = list(range(self.num_pages, 0, -1))
        self._page_is_free = np.ones(self.num_pages + 1, dtype=bool)  # numpy: a free checks all its pages at once
        self._page_is_free[0] = False

    def available_size(self) -> int:
        """Free capacity in tokens (always a multiple of ``page_size``)."""
        return len(self._free_pages) * self.page_size

    def free_page_ids(self) -> list[int]:
        return list(self._free_pages)

    def num_new_pages(self, prefix_lens: Sequence[int], seq_lens: Sequence[int]) -> int:
        """Pages needed to grow each request from ``prefix_lens[i]`` to ``seq_lens[i]`` tokens."""
        ps = self.page_size
        return sum(-(-s // ps) - (-(-p // ps)) for p, s in zip(prefix_lens, seq_lens))

    def _take_pages(self, n: int) -> list[int]:
        pages = self._free_pages[len(self._free_pages) - n :][::-1] if n else []
        del self._free_pages[len(self._free_pages) - n :]
        self._page_is_free[pages] = False
        return pages

    def _page_slots(self, pages: list[int]) -> torch.Tensor:
        base = torch.tensor(pages, dtype=torch.int64).view(-1, 1) * self.page_size
        return (base + torch.arange(self.page_size, dtype=torch.int64)).view(-1)

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """All slots of ``ceil(num_tokens / page_size)`` fresh pages, or ``None`` if too few are free.

        The result has ``ceil(num_tokens / page_size) * page_size`` entries; slots past
        ``num_tokens`` belong to the caller too and are freed together with their page.
        """
        n = -(-num_tokens // self.page_size)
        if n > len(self._free_pages):
            return None
        return self._page_slots(self._take_pages(n)).to(self.device)

    def alloc_extend(
        self, prefix_lens: Sequence[int], seq_lens: Sequence[int], last_loc: Sequence[int]
    ) -> torch.Tensor | None:
        """Slots for positions ``[prefix_lens[i], seq_lens[i])`` of every request, concatenated.

        ``last_loc[i]`` is the slot of position ``prefix_lens[i] - 1`` (ignored when the
        prefix ends on a page boundary, e.g. ``-1`` for an empty prefix). A partially filled
        last page is filled first (slots ``last_loc + 1, ...``), then fresh pages follow.
        Returns ``None`` (nothing allocated) if the free list is too short.
        """
        ps = self.page_size
        prefix_lens = [int(p) for p in prefix_lens]
        seq_lens = [int(s) for s in seq_lens]
        last_loc = [int(x) for x in last_loc]
        for p, s, last in zip(prefix_lens, seq_lens, last_loc, strict=True):
            if not 0 <= p <= s:
                raise ValueError(f"alloc_extend needs 0 <= prefix_len <= seq_len, got {p}, {s}.")
            if p % ps and (last + 1) % ps != p % ps:
                raise ValueError(
                    f"last_loc={last} cannot hold position {p - 1} with page_size={ps}: a request's "
                    f"position pos must sit at offset pos % page_size of its page; pass req_to_token[row, prefix_len - 1]."
                )
        if self.num_new_pages(prefix_lens, seq_lens) > len(self._free_pages):
            return None
        out: list[torch.Tensor] = []
        for p, s, last in zip(prefix_lens, seq_lens, last_loc):
            in_last_page = min(s, -(-p // ps) * ps) - p  # positions that fit in the open page
            if in_last_page > 0:
                out.append(torch.arange(last + 1, last + 1 + in_last_page, dtype=torch.int64))
            rest = s - p - in_last_page
            if rest > 0:
                out.append(self._page_slots(self._take_pages(-(-rest // ps)))[:rest])
        if not out:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        return torch.cat(out).to(self.device)

    def alloc_decode(self, seq_lens: Sequence[int], last_loc: Sequence[int]) -> torch.Tensor | None:
        """One slot per request for position ``seq_lens[i] - 1`` (the token being decoded).

        A new page is taken exactly when that position opens a page; otherwise the slot
        is ``last_loc[i] + 1``.
        """
        return self.alloc_extend([int(s) - 1 for s in seq_lens], seq_lens, last_loc)

    def free(self, indices: torch.Tensor) -> None:
        """Free every page that contains one of ``indices`` (any device, any integer dtype)."""
        if indices.numel() == 0:
            return
        ps = self.page_size
        if indices.numel() <= 64:  # a few pages (a partial page, a short leaf): Python beats numpy's call cost
            pages = sorted({s // ps for s in indices.tolist()})
        else:  # sorted, once each; slots usually come in ascending runs, which need no sort
            pages = indices.detach().to("cpu", torch.int64).numpy()
            pages = pages // ps if ps > 1 else pages
            if not (pages[1:] >= pages[:-1]).all():
                pages = np.sort(pages)
            new = pages[1:] != pages[:-1]
            pages = pages if new.all() else pages[np.concatenate(([True], new))]
        if pages[0] < 1 or pages[-1] > self.num_pages:
            p = int(pages[0] if pages[0] < 1 else pages[-1])
            raise ValueError(f"page {p} is not allocatable (page 0 is reserved, pages run 1..{self.num_pages}).")
        twice = self._page_is_free[pages]
        if twice.any():
            p = int(pages[twice.argmax()])
            raise ValueError(f"double free of page {p} (slots {p * ps}..{(p + 1) * ps - 1}).")
        self._page_is_free[pages] = True
        # Freed pages are reused first (reversed so they come back out in ascending order).
        self._free_pages.extend(pages[::-1] if type(pages) is list else pages[::-1].tolist())


class MHATokenToKVPool:
    """Per-layer K and V buffers ``[num_slots, head_num, head_dim]`` for one rank.

    ``head_num`` is the number of KV heads *this rank* holds (all of them without tensor
    parallelism). ``num_slots = (size // page_size + 1) * page_size``: the extra page is
    the reserved page 0 (dummy/padding slots). Build the matching allocator with the same
    ``size`` and ``page_size``.
    """

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str | torch.device = "cpu",
    ) -> None:
        self.page_size = page_size
        self.size = num_usable_pages(size, page_size) * page_size
        self.num_slots = self.size + page_size
        self.dtype = dtype
        self.head_num = head_num
        self.head_dim = head_dim
        self.layer_num = layer_num
        self.device = torch.device(device)
        shape = (self.num_slots, head_num, head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layer_num)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(layer_num)]

    @property
    def bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.layer_num, self.head_num, self.head_dim, self.dtype)

    def kv_size_bytes(self) -> int:
        """Bytes held by all K and V buffers, the reserved page included."""
        return self.bytes_per_token * self.num_slots

    def set_kv_buffer(self, layer_id: int, loc: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> None:
        """Write K/V ``[len(loc), head_num, head_dim]`` of new tokens into slots ``loc`` of one layer."""
        expected = (loc.numel(), self.head_num, self.head_dim)
        if tuple(cache_k.shape) != expected or tuple(cache_v.shape) != expected:
            raise ValueError(
                f"layer {layer_id}: K/V must have shape {expected} (tokens, KV heads per rank, head_dim), "
                f"got {tuple(cache_k.shape)} and {tuple(cache_v.shape)}."
            )
        loc = loc.to(self.device, torch.int64)
        self.k_buffer[layer_id][loc] = cache_k.to(self.dtype)
        self.v_buffer[layer_id][loc] = cache_v.to(self.dtype)

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k_buffer[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v_buffer[layer_id]

    def get_kv_buffer(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k_buffer[layer_id], self.v_buffer[layer_id]
