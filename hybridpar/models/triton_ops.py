"""Triton kernels for the decoder's small element-wise operations: RMSNorm (with the residual add), SwiGLU, RoPE.

Written as plain PyTorch, each of these is a chain of kernels: RMSNorm eight (cast, square,
mean, add, rsqrt, multiply, cast, scale), RoPE about seventeen, SwiGLU two, and the residual add
one more. At batch 1 they move almost no data, yet inside a CUDA graph each still costs a launch
slot of a microsecond or two: some sixty per layer, thousands per step. Here each is one kernel.

The kernels reproduce the modules' *rounding*, not only their formula: every place where the
PyTorch code rounds to the activation dtype (the residual sum, the normalised activations, the
SiLU output, ``cos``/``sin`` and each product of the rotation) rounds here too. Results equal the
PyTorch path's up to one unit in the last place: a reduction (the mean of squares) may sum in
another order, and the GPU compiler may fuse a multiply into an add. In Triton's interpreter,
where the CPU tests run them in float32, they are bitwise equal.

* :func:`rms_norm`: ``(weight * norm(x + residual), x + residual)`` in one pass (vLLM's
  ``fused_add_rms_norm``), or ``weight * norm(x)`` without a residual; rows of a 2-D or a
  ``[T, H, d]`` (per-head, Qwen3's q/k norm) tensor, strided views allowed.
* :func:`silu_and_mul`: ``silu(gate) * up`` of the fused gate/up output.
* :func:`store_kv`: a decode step's new K and V written to their slots of the pool, one kernel.
* :func:`rotary`: Q and K rotated by their positions, written to new contiguous tensors (so
  attention kernels get dense queries). ``cos``/``sin`` come from a table that PyTorch computed
  once per model (:meth:`~hybridpar.models.rotary.RotaryEmbedding.cos_sin_table`), so they are PyTorch's own values:
  a GPU's fast ``cos`` drifts at the large angles of long positions.

Import needs Triton; :mod:`hybridpar.models.fused_ops` decides when these run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, Y, S, stride_xt, stride_xh, stride_rt, stride_yt, stride_st, num_heads, n_cols, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    t = row // num_heads
    h = row % num_heads
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = Y.dtype.element_ty
    x = tl.load(X + t * stride_xt + h * stride_xh + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:  # the residual stream is kept in the activation dtype: round the sum
        x = (x + tl.load(R + t * stride_rt + offs, mask=mask, other=0.0).to(tl.float32)).to(dtype)
        tl.store(S + t * stride_st + offs, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    normed = (x * inv_rms).to(dtype).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + t * stride_yt + h * n_cols + offs, (w * normed).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
             ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of the rows of ``x`` (``[T, N]``, or ``[T, H, N]`` normalised per head; last dim contiguous).

    With ``residual [T, N]``: returns ``(weight * norm(x + residual), x + residual)``, the sum
    rounded to ``x``'s dtype first, as the decoder's residual stream is. Without: the normed ``x``.
    """
    if x.stride(-1) != 1:
        raise ValueError("rms_norm needs the last dimension contiguous")
    t, n = x.shape[0], x.shape[-1]
    heads = x.shape[1] if x.dim() == 3 else 1
    stride_h = x.stride(1) if x.dim() == 3 else 0
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(residual) if residual is not None else y
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(t * heads,)](
        x, residual if residual is not None else x, weight, y, summed, x.stride(0), stride_h,
        residual.stride(0) if residual is not None else 0, heads * n, summed.stride(0), heads, n, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return (y, summed) if residual is not None else y


@triton.jit
def _silu_and_mul_kernel(GU, O, stride_gu, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = O.dtype.element_ty
    gate = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GU + row * stride_gu + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # F.silu rounds its output
    tl.store(O + row * stride_o + offs, (act * up).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up [T, 2N]`` = ``[gate | up]``; returns ``[T, N]``."""
    t, n = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    _silu_and_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n,
                                                     BLOCK=block, num_warps=4)
    return out


@triton.jit
def _rotate(x1, x2, cos, sin, dtype):
    """``[x1, x2] * cos + [-x2, x1] * sin``, each product and the sum rounded to ``dtype`` as in PyTorch."""
    o1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    o2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    return o1.to(dtype), o2.to(dtype)


@triton.jit
def _rotate_heads(X, XO, t, stride_t, stride_h, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rotate the ``num_heads`` heads of token ``t`` of ``X`` into the contiguous ``XO``."""
    dtype = XO.dtype.element_ty
    offs_h = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, HALF)[None, :]
    mask = offs_h < num_heads
    src = X + t * stride_t + offs_h * stride_h + offs_d
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    # [x1, x2] * cos + [-x2, x1] * sin, each product and the sum rounded to the dtype as in PyTorch
    o1 = (x1 * cos).to(dtype).to(tl.float32) + (-x2 * sin).to(dtype).to(tl.float32)
    o2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    dst = XO + (t * num_heads + offs_h) * (2 * HALF) + offs_d
    tl.store(dst, o1.to(dtype), mask=mask)
    tl.store(dst + HALF, o2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(Pos, CosSin, Q, K, QO, KO, stride_qt, stride_qh, stride_kt, stride_kh, num_q_heads, num_k_heads,
                   HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    t = tl.program_id(0)
    row = CosSin + tl.load(Pos + t).to(tl.int64) * (2 * HALF) + tl.arange(0, HALF)
    cos = tl.load(row).to(tl.float32)[None, :]
    sin = tl.load(row + HALF).to(tl.float32)[None, :]
    _rotate_heads(Q, QO, t, stride_qt, stride_qh, num_q_heads, cos, sin, HALF, BLOCK_H)
    _rotate_heads(K, KO, t, stride_kt, stride_kh, num_k_heads, cos, sin, HALF, BLOCK_H)


def rotary_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether :func:`rotary` takes these shapes (``tl.arange`` spans a power of two)."""
    d = q.shape[-1]
    return q.stride(-1) == 1 and k.stride(-1) == 1 and d >= 2 and not d & (d - 1)


def rotary(positions: torch.Tensor, cos_sin: torch.Tensor, q: torch.Tensor, k: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ("rotate half" layout) of ``q [T, Hq, d]`` and ``k [T, Hk, d]`` (strided views allowed);
    new contiguous tensors. ``cos_sin [max_positions, d]``: row ``p`` holds ``cos`` then ``sin`` of
    position ``p``'s ``d/2`` angles, in q's dtype (:meth:`~hybridpar.models.rotary.RotaryEmbedding.cos_sin_table`)."""
    t, hq, d = q.shape
    hk = k.shape[1]
    if not rotary_supported(q, k):
        raise ValueError(f"rotary needs a power-of-two head_dim >= 2 and a contiguous last dimension; got {d}")
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rotary_kernel[(t,)](positions, cos_sin, q, k, q_out, k_out, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                         hq, hk, HALF=d // 2, BLOCK_H=triton.next_power_of_2(max(hq, hk)), num_warps=4)
    return q_out, k_out


@triton.jit
def _store_kv_kernel(K, V, KStore, VStore, Loc, stride_kt, stride_vt, stride_ks, stride_vs,
                     ROW: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(Loc + t).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < ROW
    tl.store(KStore + slot * stride_ks + offs, tl.load(K + t * stride_kt + offs, mask=mask), mask=mask)
    tl.store(VStore + slot * stride_vs + offs, tl.load(V + t * stride_vt + offs, mask=mask), mask=mask)


def store_kv_supported(k_store: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`store_kv` takes these tensors: each token's heads contiguous, the store's dtype."""
    return (k.dtype == v.dtype == k_store.dtype and k.stride(1) == k.shape[2] and v.stride(1) == v.shape[2]
            and k.stride(2) == v.stride(2) == 1)


def store_kv(k_store: torch.Tensor, v_store: torch.Tensor, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """``k_store[loc[t]] = k[t]`` and ``v_store[loc[t]] = v[t]`` in one kernel (``[N, Hkv, d]`` stores,
    ``k``/``v`` ``[T, Hkv, d]`` with contiguous heads, the stores' dtype)."""
    row = k.shape[1] * k.shape[2]
    if not store_kv_supported(k_store, k, v):
        raise ValueError("store_kv needs each token's heads contiguous and the store's dtype")
    _store_kv_kernel[(k.shape[0],)](k, v, k_store, v_store, loc, k.stride(0), v.stride(0), k_store.stride(0),
                                    v_store.stride(0), ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4)
