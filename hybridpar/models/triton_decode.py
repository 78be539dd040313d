"""Paged decode attention in Triton: split-KV, two stages, reading K/V in place through slot indices.

The torch path (:func:`~hybridpar.models.decode_attention.decode_attention`) gathers every
request's K and V into a padded ``[B, Hkv, L, d]`` tensor and then attends over it: the live KV
crosses HBM three times (read, write, read). This kernel reads each slot's K and V straight from
the pool, once. A request's keys are described the way SGLang's decode kernels describe them:
``kv_indices`` holds slot numbers, request ``i``'s ``kv_lens[i]`` slots start at
``kv_indptr[i]`` (for a ragged batch ``kv_indptr`` is the running sum of ``kv_lens``; for the
graph runner's padded ``[B, Lb]`` table it is ``i * Lb``, and ``kv_lens`` is ``seq_lens``).

* **Stage 1** (one program per request, KV head and *split*): the request's keys are cut into
  ``num_kv_splits`` consecutive ranges, so that even batch 1 fills the GPU. A program loads the
  ``G = Hq / Hkv`` query heads that share its KV head (padded to 16 rows for ``tl.dot``), walks
  its range in blocks of ``BLOCK_N`` slots with an online softmax, and writes its partial output
  (normalised) and its log-sum-exp (base 2).
* **Stage 2** (one program per request and query head): merges the splits, weighting each
  partial output by ``2^(lse_s - max lse)``. An empty split has ``lse = -inf`` and weight 0.

Every shape depends only on ``B``, the heads and ``num_kv_splits``; lengths are read on the
device, so the kernels can be captured in a CUDA graph. Import needs Triton (GPU machines);
the CPU path never imports this module.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kv(Q, K, V, kv_indptr, kv_lens, kv_indices, O_part, LSE_part, sm_scale_log2,
                     stride_qb, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                     stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                     G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    length = tl.load(kv_lens + b).to(tl.int32)
    first = tl.load(kv_indptr + b).to(tl.int64)
    per_split = tl.cdiv(length, NUM_SPLITS)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, length)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < G
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * G + offs_h
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        mask_n = n < hi
        slot = tl.load(kv_indices + first + n, mask=mask_n, other=0).to(tl.int64)
        k = tl.load(K + slot[:, None] * stride_kn + kv_head * stride_kh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * sm_scale_log2  # [BLOCK_H, BLOCK_N]
        qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + slot[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :],
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    live = l_i > 0
    out = acc / tl.where(live, l_i, 1.0)[:, None]
    lse = tl.where(live, m_i + tl.log2(tl.where(live, l_i, 1.0)), float("-inf"))
    o_ptr = O_part + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
    tl.store(o_ptr, out, mask=mask_h[:, None] & mask_d[None, :])
    tl.store(LSE_part + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


@triton.jit
def _merge_splits(O_part, LSE_part, O, stride_ob, stride_oh, stride_os, stride_lb, stride_lh,
                  stride_fb, stride_fh, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr):
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(LSE_part + b * stride_lb + head * stride_lh + offs_s)
    weight = tl.exp2(lse - tl.max(lse, 0))  # 0 for empty splits
    part = tl.load(O_part + b * stride_ob + head * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                   mask=mask_d[None, :], other=0.0)
    out = tl.sum(part * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(O + b * stride_fb + head * stride_fh + offs_d, out.to(O.dtype.element_ty), mask=mask_d)


def num_kv_splits_for(batch_size: int, num_kv_heads: int, max_len: int, num_sms: int = 132,
                      block_n: int = 32) -> int:
    """Splits per request: enough programs for about two waves of the GPU, no split shorter than a block."""
    want = triton.cdiv(2 * num_sms, max(batch_size * num_kv_heads, 1))
    cap = max(triton.cdiv(max_len, block_n), 1)
    return min(triton.next_power_of_2(max(min(want, cap), 1)), 64)


def decode_attention_fwd(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, kv_indptr: torch.Tensor,
                         kv_lens: torch.Tensor, kv_indices: torch.Tensor, sm_scale: float, num_kv_splits: int,
                         block_n: int = 32) -> torch.Tensor:
    """``o [B, Hq, d]``: query ``q[i]`` attends to slots ``kv_indices[kv_indptr[i] : kv_indptr[i] + kv_lens[i]]``.

    ``k_buffer``/``v_buffer`` ``[N, Hkv, d]`` (the pool, read in place); ``num_kv_splits`` a power of two,
    fixed per captured graph (:func:`num_kv_splits_for`). Query head ``h`` reads KV head ``h // (Hq / Hkv)``.
    """
    b, hq, d = q.shape
    hkv = k_buffer.shape[1]
    if hq % hkv or num_kv_splits & (num_kv_splits - 1):
        raise ValueError(f"need Hq % Hkv == 0 and a power-of-two num_kv_splits; got {hq}, {hkv}, {num_kv_splits}")
    group = hq // hkv
    o_part = torch.empty(b, hq, num_kv_splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, num_kv_splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    precision = "ieee" if q.dtype == torch.float32 else None  # fp32: exact products, not TF32
    block_d = max(16, triton.next_power_of_2(d))  # tl.dot reduces over at least 16
    _decode_split_kv[(b, hkv, num_kv_splits)](
        q, k_buffer, v_buffer, kv_indptr, kv_lens, kv_indices, o_part, lse, sm_scale * LOG2E,
        q.stride(0), q.stride(1), k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0), lse.stride(1),
        G=group, BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n, HEAD_DIM=d, BLOCK_D=block_d,
        NUM_SPLITS=num_kv_splits, PRECISION=precision, num_warps=4, num_stages=2)
    _merge_splits[(b, hq)](o_part, lse, out, o_part.stride(0), o_part.stride(1), o_part.stride(2), lse.stride(0),
                           lse.stride(1), out.stride(0), out.stride(1), HEAD_DIM=d, BLOCK_D=block_d,
                           NUM_SPLITS=num_kv_splits, num_warps=2)
    return out
