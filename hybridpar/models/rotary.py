"""Rotary position embeddings (RoPE), including Llama-3's frequency scaling.

RoPE rotates each pair of channels ``(x[i], x[i + d/2])`` of a query/key head by the angle
``position * inv_freq[i]`` (the "rotate half" layout that Hugging Face checkpoints use). Because
the rotation depends only on the token's own position, it is applied per token on the flattened
ragged batch: no padding, no batch dimension. Heads are independent, so RoPE is the same on every
tensor-parallel rank.

Numerics follow transformers: inverse frequencies and angles in float32, ``cos``/``sin`` cast
to the activation dtype, the rotation done in the activation dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hybridpar.models.config import RopeConfig
from hybridpar.models.fused_ops import use_fused


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """``inv_freq[i] = theta^(-2i/d)`` for ``i < d/2``, scaled according to ``rope.rope_type``.

    * ``default``: unscaled.
    * ``linear``: every frequency divided by ``factor`` (positions interpolated).
    * ``llama3``: wavelengths shorter than ``original_max / high_freq_factor`` are kept, longer than
      ``original_max / low_freq_factor`` are divided by ``factor``, and the band in between is
      interpolated smoothly between the two.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type != "llama3":
        return inv_freq
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


_TABLES: dict[tuple, torch.Tensor] = {}  # cos/sin tables shared by every layer with the same frequencies


class RotaryEmbedding(nn.Module):
    """``forward(positions [T], q [T, Hq, d], k [T, Hk, d]) -> (q, k)`` rotated by their positions.

    ``max_positions``: the positions the fused kernel's table covers (the model's context).
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int = 32768) -> None:
        super().__init__()
        self.head_dim, self.max_positions = head_dim, max_positions
        self.rope = rope
        self.register_buffer("inv_freq", inverse_frequencies(rope, head_dim), persistent=False)
        self._table_key = (tuple(self.inv_freq.tolist()), max_positions)  # this module's cos/sin table

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``, ``sin`` of shape ``[T, 1, d]`` (broadcast over heads)."""
        freqs = positions.to(torch.float32)[:, None] * self.inv_freq.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if use_fused(q):
            from hybridpar.models.triton_ops import rotary, rotary_supported

            if rotary_supported(q, k):
                return rotary(positions, self.cos_sin_table(q.dtype, q.device), q, k)
        cos, sin = self.cos_sin(positions, q.dtype)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def cos_sin_table(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``[max_positions, head_dim]``: row ``p`` is ``cos`` then ``sin`` of position ``p``'s angles, made by
        :meth:`cos_sin` itself, so the fused kernel reads exactly the values the PyTorch path computes
        (down to where ``inv_freq`` was computed: on a GPU, ``pow`` may round differently than on the
        CPU). One table per frequency set, dtype and device, shared by every layer; built at the
        first call, which is eager (prefill, or a graph's warm-up), never inside a capture."""
        key = (*self._table_key, dtype, torch.device(device))
        if key not in _TABLES:
            cos, sin = self.cos_sin(torch.arange(self.max_positions, device=device), dtype)
            half = self.head_dim // 2
            _TABLES[key] = torch.cat((cos[:, 0, :half], sin[:, 0, :half]), dim=-1).contiguous()
        return _TABLES[key]

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, theta={self.rope.theta}, type={self.rope.rope_type}"
