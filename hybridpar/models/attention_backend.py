"""The seam between the model and its KV cache: :class:`ForwardBatch` and :class:`AttentionBackend`.

The model never sees padding or a batch dimension. One forward pass works on a *flattened ragged
batch*: the new tokens of all requests concatenated, ``hidden [T, hidden_size]`` with
``positions [T]``, described by a :class:`ForwardBatch`:

* ``req_pool_indices[i]``: the cache row (slot) of request ``i``;
* ``extend_seq_lens[i]``: how many new tokens request ``i`` brings (``sum == T``, in order);
* ``seq_lens[i]``: the request's length *after* this step, so its cached prefix is
  ``prefix_lens[i] = seq_lens[i] - extend_seq_lens[i]`` tokens;
* ``forward_mode``: PREFILL (every prefix is empty), EXTEND (new tokens after a cached prefix) or
  DECODE (one new token per request).

Every attention layer calls ``forward_batch.attn_backend.forward(layer_id, q, k, v, forward_batch)``
with this rank's heads (``q [T, Hq, d]``, ``k``/``v`` ``[T, Hkv, d]``) and gets ``o [T, Hq, d]``.
The backend owns the K/V storage: it stores the new ``k``/``v`` and lets each new token attend,
causally, to its own request's prefix and to the new tokens up to itself. Under tensor parallelism
every rank has its own backend holding only its KV heads; the index structures are identical on
all ranks.

:class:`ContiguousKVCache` is the simplest backend: one row ``[max_seq_len, Hkv, d]`` per request
and layer, positions stored at their own offset. The paged RadixAttention backend
(:mod:`hybridpar.radix`) implements the same two methods but stores K/V at integer slots
``forward_batch.out_cache_loc`` of a shared token pool and reads a request's history through
``req_to_token[req_pool_indices[i], :seq_lens[i]]``. Because the model only talks to this
interface, swapping the cache changes no model code.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


class ForwardMode(enum.Enum):
    PREFILL = "prefill"  # all prefixes empty
    EXTEND = "extend"  # new tokens appended to cached prefixes
    DECODE = "decode"  # exactly one new token per request


@dataclass
class ForwardBatch:
    """Metadata of one forward pass over a flattened ragged batch (see the module docstring).

    Invariants: ``len(req_pool_indices) == len(seq_lens) == len(extend_seq_lens)``;
    ``1 <= extend_seq_lens[i] <= seq_lens[i]``; ``positions`` has ``sum(extend_seq_lens)`` entries;
    in DECODE every ``extend_seq_lens[i] == 1``; in PREFILL ``extend_seq_lens == seq_lens``.
    """

    forward_mode: ForwardMode
    req_pool_indices: list[int]
    seq_lens: list[int]
    extend_seq_lens: list[int]
    positions: torch.Tensor
    attn_backend: AttentionBackend
    out_cache_loc: torch.Tensor | None = None  # [T] token slots, for paged backends

    @classmethod
    def build(cls, attn_backend: AttentionBackend, req_pool_indices: Sequence[int], prefix_lens: Sequence[int],
              extend_seq_lens: Sequence[int], device: torch.device | str = "cpu",
              out_cache_loc: torch.Tensor | None = None) -> ForwardBatch:
        """A batch whose request ``i`` has ``prefix_lens[i]`` cached and ``extend_seq_lens[i]`` new tokens.

        The mode is derived (DECODE if every request brings one token after a non-empty prefix,
        PREFILL if every prefix is empty, else EXTEND) and positions are ``prefix .. prefix+new-1``.
        """
        prefix_lens, extend = [int(p) for p in prefix_lens], [int(n) for n in extend_seq_lens]
        if not (len(req_pool_indices) == len(prefix_lens) == len(extend)) or not extend:
            raise ValueError("req_pool_indices, prefix_lens and extend_seq_lens must be non-empty and equally long")
        if min(extend) < 1 or min(prefix_lens) < 0:
            raise ValueError(f"every request needs >= 1 new token and a prefix >= 0: {prefix_lens=}, {extend=}")
        if all(p == 0 for p in prefix_lens):
            mode = ForwardMode.PREFILL
        elif all(n == 1 for n in extend):
            mode = ForwardMode.DECODE
        else:
            mode = ForwardMode.EXTEND
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix_lens, extend)]).to(device)
        seq_lens = [p + n for p, n in zip(prefix_lens, extend)]
        return cls(mode, list(map(int, req_pool_indices)), seq_lens, extend, positions, attn_backend, out_cache_loc)

    @property
    def batch_size(self) -> int:
        return len(self.seq_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def prefix_lens(self) -> list[int]:
        return [s - n for s, n in zip(self.seq_lens, self.extend_seq_lens)]

    def last_token_indices(self) -> torch.Tensor:
        """Index in the flattened batch of each request's last new token (where its next token is sampled)."""
        ends = torch.tensor(self.extend_seq_lens, device=self.positions.device).cumsum(0)
        return ends - 1


class AttentionBackend(ABC):
    """Stores K/V and computes attention for one rank. One instance serves every layer."""

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Called once per forward pass, before the first layer (precompute indices, masks). Optional."""

    @abstractmethod
    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        """Store ``k``, ``v`` ``[T, Hkv, d]`` of the new tokens and return ``o [T, Hq, d]``."""


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """Masked softmax attention with grouped-query heads.

    ``q [B, Hq, n, d]``, ``k``/``v`` ``[B, Hkv, L, d]``, ``mask [B or 1, 1, n, L]`` (True = attend).
    Query head ``h`` reads KV head ``h // (Hq / Hkv)``, the grouping of Hugging Face checkpoints.
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


class ContiguousKVCache(AttentionBackend):
    """One contiguous K/V row per request: ``k_buffer[layer][row, pos] = K of token pos``.

    ``alloc(n)`` hands out rows; a row's positions ``[0, seq_len)`` are valid for the request holding
    it. Prefill/extend attend request by request (their lengths differ); decode is batched: every
    request's row is read up to the longest ``seq_len`` and masked beyond its own.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_batch_size: int,
                 max_seq_len: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 scaling: float | None = None) -> None:
        shape = (max_batch_size, max_seq_len, num_kv_heads, head_dim)
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.scaling = scaling if scaling is not None else head_dim ** -0.5
        self._free_rows = list(range(max_batch_size))

    def alloc(self, num_requests: int) -> list[int]:
        """Rows for ``num_requests`` new requests; raises if the cache is full."""
        if num_requests > len(self._free_rows):
            raise RuntimeError(f"ContiguousKVCache has {len(self._free_rows)} free rows, {num_requests} requested; "
                               f"build it with a larger max_batch_size")
        rows, self._free_rows = self._free_rows[:num_requests], self._free_rows[num_requests:]
        return rows

    def free(self, rows: Sequence[int]) -> None:
        self._free_rows.extend(rows)

    def size_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.k_buffer + self.v_buffer)

    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        fb = forward_batch
        if max(fb.seq_lens) > self.max_seq_len:
            raise RuntimeError(f"sequence of {max(fb.seq_lens)} tokens exceeds the cache's max_seq_len="
                               f"{self.max_seq_len}; build the cache with a larger max_seq_len")
        k_buf, v_buf = self.k_buffer[layer_id], self.v_buffer[layer_id]
        if fb.forward_mode == ForwardMode.DECODE:
            return self._decode(q, k, v, fb, k_buf, v_buf)
        out = torch.empty_like(q)
        start = 0
        for row, seq_len, n in zip(fb.req_pool_indices, fb.seq_lens, fb.extend_seq_lens):
            prefix = seq_len - n
            k_buf[row, prefix:seq_len] = k[start:start + n]
            v_buf[row, prefix:seq_len] = v[start:start + n]
            q_pos = torch.arange(prefix, seq_len, device=q.device)
            mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]  # [n, seq_len]
            o = attend(q[start:start + n].transpose(0, 1)[None], k_buf[row, :seq_len].transpose(0, 1)[None],
                       v_buf[row, :seq_len].transpose(0, 1)[None], mask[None, None], self.scaling)
            out[start:start + n] = o[0].transpose(0, 1)
            start += n
        return out

    def _decode(self, q, k, v, fb: ForwardBatch, k_buf: torch.Tensor, v_buf: torch.Tensor) -> torch.Tensor:
        rows = torch.tensor(fb.req_pool_indices, device=q.device)
        seq_lens = torch.tensor(fb.seq_lens, device=q.device)
        k_buf[rows, seq_lens - 1] = k
        v_buf[rows, seq_lens - 1] = v
        max_len = max(fb.seq_lens)
        keys = k_buf[rows, :max_len].transpose(1, 2)  # [B, Hkv, L, d]
        values = v_buf[rows, :max_len].transpose(1, 2)
        mask = (torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None])[:, None, None, :]
        o = attend(q[:, :, None, :], keys, values, mask, self.scaling)  # [B, Hq, 1, d]
        return o[:, :, 0, :]
