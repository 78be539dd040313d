"""RadixAttention's attention backend: K/V in a shared, paged token pool addressed by integer slots.

It plugs into the model through the same seam as
:class:`~hybridpar.models.attention_backend.ContiguousKVCache` (``ForwardBatch`` +
``AttentionBackend.forward``), so no model code changes. What differs is *where* K/V live::

    write:  k_buffer[layer][out_cache_loc[t]] = k[t]                 # every new token t
    read:   slots = req_to_token[req_pool_indices[i], :seq_lens[i]]  # request i's whole history
            K_i = k_buffer[layer][slots]                             # cached prefix + new tokens

Because a request's history is read through its row of slot indices, the first
``prefix_lens[i]`` positions may be slots that *another* request computed (a radix-cache hit):
the backend neither knows nor cares. A batch may mix requests with and without a cached prefix,
with one or many new tokens each (prefill, chunked prefill, extend after a hit, decode).

Invariant the scheduler guarantees (checked when ``check_reads=True``): before the forward,
``req_to_token[row, prefix:seq_len]`` equals this request's segment of ``out_cache_loc`` and
every prefix slot has been written. Under tensor parallelism every rank runs this backend with
its own ``MHATokenToKVPool`` (its KV heads only) and an identical ``req_to_token`` table, so the
same slot holds the same token's K/V shard on every rank.
"""

from __future__ import annotations

import torch

from hybridpar.models.attention_backend import AttentionBackend, ForwardBatch, ForwardMode, attend
from hybridpar.radix.mem_pool import MHATokenToKVPool, ReqToTokenPool


class RadixAttentionBackend(AttentionBackend):
    """Paged attention over a :class:`MHATokenToKVPool` through a :class:`ReqToTokenPool`.

    ``filled[slot]`` records which slots have been written at least once (all layers are
    written together); it is what the cross-rank pool digest hashes. With ``check_reads`` every
    forward verifies the invariant in the module docstring (costs a device sync: tests only).
    """

    def __init__(self, req_to_token_pool: ReqToTokenPool, token_to_kv_pool: MHATokenToKVPool,
                 scaling: float | None = None, check_reads: bool = False) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = token_to_kv_pool
        self.scaling = scaling if scaling is not None else token_to_kv_pool.head_dim ** -0.5
        self.check_reads = check_reads
        self.filled = torch.zeros(token_to_kv_pool.num_slots, dtype=torch.bool, device=token_to_kv_pool.device)
        self._slots: list[torch.Tensor] = []  # per request: slots of positions [0, seq_len)
        self._masks: list[torch.Tensor] = []  # per request: causal mask [n_new, seq_len]
        self._decode_slots: torch.Tensor | None = None  # [B, max_len], padded
        self._decode_mask: torch.Tensor | None = None  # [B, 1, 1, max_len]

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Gather each request's slot row once per forward; every layer reuses it."""
        fb = forward_batch
        loc = fb.out_cache_loc
        if loc is None or loc.numel() != fb.num_tokens:
            raise ValueError(f"RadixAttentionBackend needs forward_batch.out_cache_loc with one slot per new token "
                             f"({fb.num_tokens}); got {None if loc is None else loc.numel()}. Allocate slots with "
                             f"hybridpar.radix.alloc_for_extend / alloc_for_decode.")
        table = self.req_to_token_pool.req_to_token
        device = self.token_to_kv_pool.device
        if self.check_reads:
            self._check(fb, table)
        if fb.forward_mode == ForwardMode.DECODE:
            rows = torch.tensor(fb.req_pool_indices, device=table.device)
            seq_lens = torch.tensor(fb.seq_lens, device=device)
            max_len = max(fb.seq_lens)
            self._decode_slots = table[rows, :max_len].to(device, torch.int64)
            self._decode_mask = (torch.arange(max_len, device=device)[None, :] < seq_lens[:, None])[:, None, None, :]
            return
        self._slots, self._masks = [], []
        for row, seq_len, n in zip(fb.req_pool_indices, fb.seq_lens, fb.extend_seq_lens):
            self._slots.append(table[row, :seq_len].to(device, torch.int64))
            q_pos = torch.arange(seq_len - n, seq_len, device=device)
            self._masks.append(torch.arange(seq_len, device=device)[None, :] <= q_pos[:, None])

    def _check(self, fb: ForwardBatch, table: torch.Tensor) -> None:
        start = 0
        for row, seq_len, n in zip(fb.req_pool_indices, fb.seq_lens, fb.extend_seq_lens):
            slots = table[row, :seq_len].to(torch.int64).cpu()
            mine = fb.out_cache_loc[start:start + n].to(torch.int64).cpu()
            if not torch.equal(slots[seq_len - n:], mine):
                raise RuntimeError(f"req_to_token row {row} positions [{seq_len - n}, {seq_len}) hold {slots[seq_len - n:].tolist()}"
                                   f" but out_cache_loc gives {mine.tolist()}: write the new slots into the row first.")
            unwritten = slots[: seq_len - n][~self.filled.cpu()[slots[: seq_len - n]]]
            if unwritten.numel():
                raise RuntimeError(f"req_to_token row {row} reads slots {unwritten[:8].tolist()} that were never written "
                                   f"on this rank (pool state diverged, or a prefix was freed while in use).")
            start += n

    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        fb = forward_batch
        self.token_to_kv_pool.set_kv_buffer(layer_id, fb.out_cache_loc, k, v)
        if layer_id == 0:
            self.filled[fb.out_cache_loc.to(self.filled.device, torch.int64)] = True
        k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer_id)
        if fb.forward_mode == ForwardMode.DECODE:
            keys = k_buf[self._decode_slots].transpose(1, 2)  # [B, Hkv, L, d]
            values = v_buf[self._decode_slots].transpose(1, 2)
            o = attend(q[:, :, None, :], keys, values, self._decode_mask, self.scaling)  # [B, Hq, 1, d]
            return o[:, :, 0, :]
        out = torch.empty_like(q)
        start = 0
        for slots, mask, n in zip(self._slots, self._masks, fb.extend_seq_lens):
            o = attend(q[start:start + n].transpose(0, 1)[None], k_buf[slots].transpose(0, 1)[None],
                       v_buf[slots].transpose(0, 1)[None], mask[None, None], self.scaling)
            out[start:start + n] = o[0].transpose(0, 1)
            start += n
        return out
