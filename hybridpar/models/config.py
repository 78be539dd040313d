"""Model configuration: a transformers config normalised into one small dataclass.

Qwen2, Llama and Qwen3 are the same decoder with different switches; :class:`ModelConfig`
holds exactly the switches :mod:`hybridpar.models.decoder` reads:

==================  =========  =========  =========
switch              Qwen2      Llama      Qwen3
==================  =========  =========  =========
qkv_bias            True       attention_bias  attention_bias
o_bias              False      attention_bias  attention_bias
mlp_bias            False      mlp_bias   False
qk_norm             False      False      True
head_dim            h/heads    head_dim or h/heads  head_dim
==================  =========  =========  =========

It reads both the transformers 4.x spelling (``rope_theta`` + ``rope_scaling``) and the 5.x one
(``rope_parameters``) of the RoPE settings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridpar.models.moe_config import MOE_ARCHITECTURES, MoeConfig, check_moe_parallel
from hybridpar.roofline import ModelShape

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear")


class UnsupportedArchitectureError(ValueError):
    """A checkpoint whose architecture (or a feature of it) this decoder does not implement."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters. ``rope_type`` is one of :data:`SUPPORTED_ROPE_TYPES`."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ModelShape):
    """Everything the decoder needs, in TP-independent (global) sizes.

    The shape numbers (``hidden_size``, ``num_layers``, heads, ``head_dim``, ``vocab_size``,
    ``tie_word_embeddings``, ``qkv_bias``; ``name`` is the checkpoint directory's name) are
    chapter 1's :class:`~hybridpar.roofline.ModelShape`, so a loaded config goes straight into the
    roofline and memory arithmetic; this class adds what running the model needs.
    """

    architecture: str
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str = "float32"
    moe: MoeConfig | None = None  # Qwen2-MoE: experts, router, shared expert (see moe_config.py)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        """The checkpoint's dtype (``torch_dtype`` in config.json)."""
        return getattr(torch, self.torch_dtype)

    def num_parameters(self) -> int:
        """Parameters of the full (unsharded) model, counting tied embeddings once."""
        h, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_heads * hd, self.num_kv_heads * hd
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * self.qkv_bias + h * self.o_bias + 2 * hd * self.qk_norm
        mlp = 3 * h * i + (2 * i + h) * self.mlp_bias
        mlps = sum(self.moe.block_parameters(h) if self.moe is not None and self.moe.is_sparse(layer) else mlp
                   for layer in range(self.num_layers))
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + 2 * h) + mlps + embed + h

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Read ``path/config.json`` through ``transformers.AutoConfig`` (never with remote code)."""
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{str(path)!r} has no config.json")
        raw = json.loads(config_file.read_text())
        check_architecture(raw.get("architectures"), str(config_file))
        from transformers import AutoConfig

        return cls.from_hf_config(AutoConfig.from_pretrained(str(path), trust_remote_code=False))

    @classmethod
    def from_hf_config(cls, hf: Any) -> ModelConfig:
        """Normalise a transformers ``PretrainedConfig`` (4.x or 5.x) of a supported architecture."""
        arch = check_architecture(getattr(hf, "architectures", None), "the config")
        act = getattr(hf, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(f"hidden_act={act!r} is not supported (only 'silu', i.e. SwiGLU)")
        if getattr(hf, "use_sliding_window", False):
            raise UnsupportedArchitectureError(
                "use_sliding_window=True is not supported (full causal attention only); set it to false")
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        is_qwen2 = arch in ("Qwen2ForCausalLM", "Qwen2MoeForCausalLM")
        attention_bias = bool(getattr(hf, "attention_bias", False))
        qkv_bias = bool(getattr(hf, "qkv_bias", True)) if arch in MOE_ARCHITECTURES else is_qwen2 or attention_bias
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or torch.float32
        dtype_name = str(dtype).removeprefix("torch.")
        return cls(
            name=Path(getattr(hf, "_name_or_path", "") or arch).name,
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            rope=rope_config(hf),
            max_position_embeddings=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=False if is_qwen2 else attention_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            eos_token_ids=eos_ids,
            bos_token_id=getattr(hf, "bos_token_id", None),
            torch_dtype=dtype_name,
            moe=MoeConfig.from_hf_config(hf) if arch in MOE_ARCHITECTURES else None,
        )


def check_architecture(architectures: list[str] | None, where: str) -> str:
    """The single supported architecture named in ``architectures``; else a clear error."""
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    if not architectures:
        raise UnsupportedArchitectureError(
            f"{where} names no architecture (config 'architectures' is empty); supported: {supported}")
    arch = architectures[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {arch!r} is not supported by hybridpar's decoder; supported architectures: {supported}")
    return arch


def rope_config(hf: Any) -> RopeConfig:
    """RoPE settings from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4)."""
    params = getattr(hf, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = params
        theta = params["rope_theta"]
    else:
        scaling = getattr(hf, "rope_scaling", None) or {}
        theta = getattr(hf, "rope_theta", 10000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitectureError("partial_rotary_factor != 1 is not supported")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(scaling.get("factor", 1.0)),
        low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
        high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings")
        or hf.max_position_embeddings,
    )


def check_tp_size(config: ModelConfig, tp_size: int, enable_expert_parallel: bool = False) -> None:
    """Raise ``ParallelConfigError`` (a ValueError) naming valid sizes unless ``tp_size`` shards this model.

    Pure: call it in the parent before spawning ranks. Heads follow the QKV layer's rule (divide the
    query heads; divide or be a multiple of the KV heads); the MLP needs ``intermediate_size % tp == 0``.
    The vocabulary is padded, so it needs nothing.
    """
    from hybridpar.layers.linear import valid_tp_sizes, validate_tp_size

    validate_tp_size(config.num_heads, config.num_kv_heads, tp_size)
    if config.moe is not None:
        check_moe_parallel(config.moe, tp_size, enable_expert_parallel=enable_expert_parallel)
    if config.intermediate_size % tp_size:
        from hybridpar.distributed.parallel_state import ParallelConfigError

        valid = [t for t in valid_tp_sizes(config.num_heads, config.num_kv_heads)
                 if config.intermediate_size % t == 0]
        raise ParallelConfigError(
            f"tensor_parallel_size={tp_size} does not divide intermediate_size={config.intermediate_size}; "
            f"valid tensor_parallel_size values for this model: {', '.join(map(str, valid))}")
