"""The Triton kernels of hybridpar.models.triton_ops against the modules' PyTorch path.

On a GPU the kernels run there; on the CPU they run in Triton's interpreter (``TRITON_INTERPRET=1``,
set by tests/conftest.py), so CI checks their arithmetic without a GPU. Without Triton the tests skip.
"""
from __future__ import annotations

import pytest
import torch

from hybridpar.models.config import RopeConfig
from hybridpar.models.decoder import RMSNorm
from hybridpar.models.fused_ops import force_fused_ops, fused_ops_disabled, use_fused
from hybridpar.models.rotary import RotaryEmbedding

pytest.importorskip("triton")  # on the CPU: in the interpreter (tests/conftest.py)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Triton's interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest: bf16 only on a GPU
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="the interpreter truncates when casting to bfloat16"))]


def ulp_close(got: torch.Tensor, want: torch.Tensor, ulps: int = 1) -> bool:
    """Equal up to ``ulps`` units in the last place of ``want``'s dtype (reductions may sum in another order)."""
    if want.dtype == torch.float32:
        return torch.allclose(got, want, rtol=1e-5, atol=1e-6)
    eps = torch.finfo(want.dtype).eps
    return bool(((got.float() - want.float()).abs() <= ulps * eps * want.float().abs().clamp_min(1e-2)).all())


def both(module_call):
    """(kernel result, PyTorch result) of the same call."""
    with force_fused_ops():
        fused = module_call()
    with fused_ops_disabled():
        ref = module_call()
    return fused, ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_with_and_without_residual(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, 1e-6, dtype).to(DEVICE)  # not a power of two: the kernel masks the block
    norm.weight.data.copy_(torch.randn(96, generator=gen))
    x, res = (torch.randn(5, 96, generator=gen).to(DEVICE, dtype) for _ in range(2))
    fused, ref = both(lambda: norm(x))
    assert ulp_close(fused, ref)
    (y, s), (y_ref, s_ref) = both(lambda: norm(x, res))
    assert torch.equal(s, s_ref)  # the residual sum rounds exactly as PyTorch's add
    assert ulp_close(y, y_ref)


def test_rms_norm_per_head_on_a_strided_view() -> None:
    """Qwen3's q/k norm: ``[T, H, d]`` heads of a fused QKV output (rows not contiguous)."""
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(4, 3 * 4 * 32, generator=gen).to(DEVICE)
    q = qkv[:, :128].view(4, 4, 32)
    norm = RMSNorm(32, 1e-6).to(DEVICE)
    norm.weight.data.copy_(torch.rand(32, generator=gen) + 0.5)
    fused, ref = both(lambda: norm(q))
    assert fused.shape == (4, 4, 32) and ulp_close(fused, ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_qkv_views(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(2)
    with torch.device(DEVICE):  # as the model is built: inv_freq made on the device (a GPU's pow rounds its own way)
        rot = RotaryEmbedding(RopeConfig(theta=10000.0), 64, max_positions=4096)
    qkv = torch.randn(6, (8 + 2 + 2) * 64, generator=gen).to(DEVICE, dtype)
    q, k = qkv[:, :512].view(6, 8, 64), qkv[:, 512:640].view(6, 2, 64)
    pos = torch.tensor([0, 1, 7, 100, 2047, 4095], device=DEVICE)
    table = rot.cos_sin_table(dtype, torch.device(DEVICE))  # the kernel's cos/sin are the PyTorch path's own
    cos, sin = rot.cos_sin(pos, dtype)
    assert torch.equal(table[pos, :32], cos[:, 0, :32]) and torch.equal(table[pos, 32:], sin[:, 0, :32])
    (qf, kf), (qr, kr) = both(lambda: rot(pos, q, k))
    assert qf.is_contiguous() and kf.is_contiguous()
    # cos/sin are PyTorch's own (the table) and every product rounds where PyTorch's does. In float32
    # on a GPU the compiler may fuse a multiply into the add (one rounding less), which shows where the
    # two products nearly cancel: allow one unit in the last place of the head's largest input there.
    # In bfloat16 each product of two bf16 numbers is exact in float32 and is rounded before the add,
    # as in PyTorch: bitwise equal (so is everything in the interpreter)
    for got, want, x in ((qf, qr, q), (kf, kr, k)):
        scale = x.float().abs().amax(-1, keepdim=True) * torch.finfo(dtype).eps
        assert ((got.float() - want.float()).abs() <= scale).all()
    if DEVICE == "cpu" or dtype == torch.bfloat16:
        assert torch.equal(qf, qr) and torch.equal(kf, kr)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    gate_up = torch.randn(3, 2 * 160, generator=gen).to(DEVICE, dtype)
    with force_fused_ops():
        from hybridpar.models.triton_ops import silu_and_mul

        fused = silu_and_mul(gate_up)
    ref = torch.nn.functional.silu(gate_up[:, :160]) * gate_up[:, 160:]
    assert ulp_close(fused, ref)


def test_store_kv_writes_both_stores_at_the_slots() -> None:
    from hybridpar.models.triton_ops import store_kv

    gen = torch.Generator().manual_seed(4)
    k_store, v_store = torch.zeros(10, 2, 8, device=DEVICE), torch.zeros(10, 2, 8, device=DEVICE)
    kv = torch.randn(3, 3 * 2 * 8, generator=gen).to(DEVICE)  # [T, q | k | v] of a fused projection
    k, v = kv[:, 16:32].view(3, 2, 8), kv[:, 32:].view(3, 2, 8)
    loc = torch.tensor([7, 2, 9], device=DEVICE)
    with force_fused_ops():
        store_kv(k_store, v_store, loc, k, v)
    assert torch.equal(k_store[loc], k) and torch.equal(v_store[loc], v)
    assert not k_store[[0, 1, 3, 4, 5, 6, 8]].any()  # nothing else written


def test_the_switch() -> None:
    x = torch.zeros(1, device=DEVICE)
    with fused_ops_disabled():
        assert not use_fused(x)
    with force_fused_ops():
        assert use_fused(x)


def test_decoder_with_fused_ops_equals_the_pytorch_path(world_of_one) -> None:
    """The whole tiny decoder (every layer, the residual stream through the fused norms, SwiGLU, RoPE) in fp32."""
    from hybridpar.bench import build_model
    from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel
    from hybridpar.models.attention_backend import ForwardBatch

    initialize_tensor_parallel(1)
    torch.manual_seed(0)
    model = build_model("qwen2-tiny", torch.device(DEVICE), torch.float32, get_tp_group())
    ids = torch.randint(0, model.config.vocab_size, (7,), device=DEVICE)

    def logits() -> torch.Tensor:
        cache = model.make_kv_cache(2, 16)
        fb = ForwardBatch.build(cache, cache.alloc(2), [0, 0], [4, 3], DEVICE)
        return model.compute_logits(model(ids, fb.positions, fb))

    fused, ref = both(logits)
    assert torch.allclose(fused, ref, rtol=1e-4, atol=1e-4)
