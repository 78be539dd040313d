"""Batched decode attention over a flat KV store, with shapes that never depend on the batch's contents.

The per-request backends (:class:`~hybridpar.models.attention_backend.ContiguousKVCache`,
:class:`~hybridpar.radix.paged_backend.RadixAttentionBackend`) build their decode indices from
Python lists every step (``torch.tensor(seq_lens)``, ``max(seq_lens)``): right, but each step
launches small host-to-device copies and its tensor shapes change with the batch, so the step
cannot be recorded once as a CUDA graph and replayed. This module is the graph-friendly form.

Both caches are one *flat* store per layer, ``k_flat [N, Hkv, d]``, addressed by integer slots:

* the contiguous cache ``k_buffer [rows, S, Hkv, d]`` viewed as ``[rows * S, Hkv, d]``: token
  ``pos`` of row ``r`` is slot ``r * S + pos``;
* the paged pool ``k_buffer [num_slots, Hkv, d]`` as it is: ``req_to_token[row, pos]`` is the slot.

One decode step of ``B`` requests is then described by three tensors of fixed shape:

* ``out_loc [B]``: the slot where each request's new K/V goes;
* ``slots [B, L]``: the slots of positions ``0 .. L-1`` of each request, ``L >= max(seq_lens)``;
  entries at positions ``>= seq_lens[i]`` may hold any valid slot (they are masked);
* ``seq_lens [B]``: each request's length including the new token.

:func:`decode_attention` gathers ``K = k_flat[slots]`` into ``[B, Hkv, L, d]`` and runs one
``scaled_dot_product_attention`` with a length mask (built once per step, not per layer). Grouped-query heads need no copy: with one
query token per request, the ``G = Hq / Hkv`` query heads that read KV head ``j`` become ``G``
*query rows* of head ``j`` (``q.view(B, Hkv, G, d)``), so every kernel sees plain multi-head
attention. :class:`StaticDecodeBackend` plugs this into the model's attention seam, reading its
three tensors from buffers that a :class:`~hybridpar.models.cuda_graph.DecodeGraphRunner` fills
before each step.

Cost: the gather copies the live KV once more (read + write) before attention reads it; at batch
1 this is small next to the weights, at large batches and long contexts it is the step's main
extra traffic.

Attention backends (SGLang's names, ``--attention-backend``): ``"torch_native"`` is the gather +
SDPA path above, the reference and the CPU path; ``"triton"`` is a split-KV paged-decode kernel
that reads every slot in place (:mod:`hybridpar.models.triton_decode`), on CUDA only.
:func:`resolve_attention_backend` turns ``None`` into the default for the device: Triton on a GPU
(where Triton imports), torch_native on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hybridpar.models.attention_backend import AttentionBackend, ForwardBatch, ForwardMode
from hybridpar.models.fused_ops import triton_available, use_fused

ATTENTION_BACKENDS = ("torch_native", "triton")


def resolve_attention_backend(name: str | None, device: torch.device | str) -> str:
    """The decode attention backend to use: ``name``, or the device's default when ``None``."""
    device = torch.device(device)
    if name is None:
        return "triton" if device.type == "cuda" and triton_available() else "torch_native"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend {name!r}; choose one of {ATTENTION_BACKENDS}")
    if name == "triton" and device.type != "cuda":
        raise ValueError("attention backend 'triton' needs a CUDA GPU; use 'torch_native' on the CPU")
    return name


def length_mask(seq_lens: torch.Tensor, length: int) -> torch.Tensor:
    """``[B, 1, 1, length]`` boolean mask: position ``j`` of request ``i`` is live iff ``j < seq_lens[i]``.

    The same for every layer of a step, so a backend builds it once per step (in :meth:`StaticDecodeBackend.bind`).
    """
    return (torch.arange(length, device=seq_lens.device)[None, :] < seq_lens[:, None])[:, None, None, :]


def decode_attention(q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, slots: torch.Tensor,
                     mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """One decode token per request attends to its live positions.

    ``q [B, Hq, d]``; ``k_flat``/``v_flat`` ``[N, Hkv, d]``; ``slots [B, L]`` int64 slots of
    positions ``0..L-1``; ``mask [B, 1, 1, L]`` from :func:`length_mask`. Returns ``o [B, Hq, d]``.
    Query head ``h`` reads KV head ``h // (Hq / Hkv)`` (Hugging Face grouping). No host sync, no
    data-dependent shape: safe inside CUDA-graph capture.
    """
    b, hq, d = q.shape
    hkv = k_flat.shape[1]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    keys = k_flat[slots].transpose(1, 2)  # [B, Hkv, L, d]
    values = v_flat[slots].transpose(1, 2)
    o = F.scaled_dot_product_attention(q.reshape(b, hkv, hq // hkv, d), keys, values, attn_mask=mask, scale=scaling)
    return o.reshape(b, hq, d)


def flat_kv(buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per-layer views ``[N, Hkv, d]`` of K or V buffers (``[rows, S, Hkv, d]`` or already flat)."""
    return [b.view(-1, *b.shape[-2:]) for b in buffers]


class StaticDecodeBackend(AttentionBackend):
    """Decode-only attention backend over flat per-layer K/V stores; see the module docstring.

    :meth:`bind` points it at ``slots [B, L]``, ``seq_lens [B]`` and ``out_loc [B]`` (normally
    slices of a runner's static buffers, so their addresses stay fixed across graph replays).
    ``forward`` writes the new K/V at ``out_loc`` and calls :func:`decode_attention`. It keeps no
    per-step Python state derived from the batch, so one captured forward serves every step of
    the same bucket.
    """

    def __init__(self, k_flat: Sequence[torch.Tensor], v_flat: Sequence[torch.Tensor], scaling: float,
                 attention_backend: str | None = None) -> None:
        if len(k_flat) != len(v_flat) or not k_flat:
            raise ValueError("need one K and one V store per layer")
        self.k_flat, self.v_flat, self.scaling = list(k_flat), list(v_flat), scaling
        self.attention_backend = resolve_attention_backend(attention_backend, k_flat[0].device)
        self.slots: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.out_loc: torch.Tensor | None = None
        self.seq_lens: torch.Tensor | None = None
        self.kv_indptr: torch.Tensor | None = None
        self.num_kv_splits = 1

    def bind(self, slots: torch.Tensor, seq_lens: torch.Tensor, out_loc: torch.Tensor) -> None:
        """Point the backend at this step's buffers; builds what every layer shares (mask or kv_indptr)."""
        self.slots, self.out_loc, self.seq_lens = slots, out_loc, seq_lens
        if self.attention_backend == "torch_native":
            self.mask = length_mask(seq_lens, slots.shape[1])
            return
        from hybridpar.models.triton_decode import num_kv_splits_for

        bb, lb = slots.shape
        self.kv_indptr = torch.arange(bb, device=slots.device) * lb  # row i of the [bb, lb] table
        self.num_kv_splits = num_kv_splits_for(bb, self.k_flat[0].shape[1], lb)

    def forward(self, layer_id: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                forward_batch: ForwardBatch) -> torch.Tensor:
        if forward_batch.forward_mode != ForwardMode.DECODE:
            raise ValueError("StaticDecodeBackend serves decode steps only; run prefill/extend through the cache's "
                             "own backend")
        if self.slots is None:
            raise RuntimeError("StaticDecodeBackend.forward before bind(slots, seq_lens, out_loc)")
        k_store, v_store = self.k_flat[layer_id], self.v_flat[layer_id]
        self._store(k_store, v_store, k, v)
        if self.attention_backend == "triton":
            from hybridpar.models.triton_decode import decode_attention_fwd

            return decode_attention_fwd(q.contiguous(), k_store, v_store, self.kv_indptr, self.seq_lens,
                                        self.slots.view(-1), self.scaling, self.num_kv_splits)
        return decode_attention(q, k_store, v_store, self.slots, self.mask, self.scaling)

    def _store(self, k_store: torch.Tensor, v_store: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """The step's new K/V at ``out_loc``: one fused kernel where it applies, else two index copies."""
        if use_fused(k):
            from hybridpar.models.triton_ops import store_kv, store_kv_supported

            if store_kv_supported(k_store, k, v):
                return store_kv(k_store, v_store, self.out_loc, k, v)
        k_store.index_copy_(0, self.out_loc, k.to(k_store.dtype))
        v_store.index_copy_(0, self.out_loc, v.to(v_store.dtype))
