"""Optional ``torch.compile`` fusion of the decoder's small element-wise ops (RMSNorm, RoPE, SwiGLU).

A CUDA graph removes the CPU from a decode step, but not the kernels: written as plain PyTorch,
each RMSNorm is eight kernels (cast, square, mean, add, rsqrt, multiply, cast, scale), RoPE about
seventeen (positions to angles, cos, sin, casts, rotate-half for Q and K), SwiGLU two. At batch 1
these kernels move almost no data, yet each costs a launch slot of a couple of microseconds
inside the graph: about sixty per layer, some 2,000 per step of a 32-layer model, milliseconds
next to a roofline of a few.

:func:`enable_compiled_ops` swaps the ``forward`` of :class:`~hybridpar.models.decoder.RMSNorm`,
:class:`~hybridpar.models.rotary.RotaryEmbedding` and :class:`~hybridpar.models.decoder.MLP`
(class-wide, for every model in the process) for versions that call one ``torch.compile``-d
function each, with dynamic shapes (one compilation serves every layer, batch and length).
Inductor fuses each into one or two kernels. GEMMs, attention and collectives are untouched, so
this works under tensor parallelism and inside the graph runner's capture.

The functions below are the *same arithmetic* as the modules' own ``forward`` (checked by the
tests); compiled, the fused kernels may round differently in the last bit (fused multiply-adds,
reduction order). :func:`disable_compiled_ops` restores the originals.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hybridpar.models.decoder import MLP, RMSNorm
from hybridpar.models.rotary import RotaryEmbedding, rotate_half


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:class:`~hybridpar.models.decoder.RMSNorm`'s arithmetic: float32 statistics, scale in the input dtype."""
    dtype = x.dtype
    x32 = x.to(torch.float32)
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope(positions: torch.Tensor, inv_freq: torch.Tensor, q: torch.Tensor, k: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`~hybridpar.models.rotary.RotaryEmbedding`'s arithmetic: angles in float32, rotation in q's dtype."""
    freqs = positions.to(torch.float32)[:, None] * inv_freq.to(positions.device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on the fused gate/up output: ``silu(gate) * up``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


_ORIGINAL = {"rms": RMSNorm.forward, "rope": RotaryEmbedding.forward, "mlp": MLP.forward}
_compiled: dict[str, object] = {}


def compiled_ops_enabled() -> bool:
    return RMSNorm.forward is not _ORIGINAL["rms"]


def enable_compiled_ops() -> None:
    """Route RMSNorm, RoPE and SwiGLU of every decoder through ``torch.compile`` (idempotent)."""
    if compiled_ops_enabled():
        return
    if not _compiled:
        _compiled.update(rms=torch.compile(rms_norm, dynamic=True), rope=torch.compile(rope, dynamic=True),
                         act=torch.compile(silu_mul, dynamic=True))
    rms, rot, act = _compiled["rms"], _compiled["rope"], _compiled["act"]

    def rms_forward(self: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        return rms(x, self.weight, self.eps)

    def rope_forward(self: RotaryEmbedding, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return rot(positions, self.inv_freq, q, k)

    def mlp_forward(self: MLP, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act(self.gate_up_proj(x)))

    RMSNorm.forward, RotaryEmbedding.forward, MLP.forward = rms_forward, rope_forward, mlp_forward


def disable_compiled_ops() -> None:
    """Restore the modules' plain PyTorch ``forward``."""
    RMSNorm.forward, RotaryEmbedding.forward, MLP.forward = _ORIGINAL["rms"], _ORIGINAL["rope"], _ORIGINAL["mlp"]
