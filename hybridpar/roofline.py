"""Back-of-the-envelope memory, compute and communication model of LLM decoding.

Chapter 1 of the book uses these functions to answer "why distribute inference at all?".
Everything here is arithmetic on a handful of shape numbers; nothing touches torch.

Conventions (the invariants the numbers rely on):

* Decoder-only transformer with grouped-query attention (GQA) and a gated (SwiGLU) MLP:
  ``q, k, v, o`` projections, then ``gate, up, down``. This covers Llama, Qwen2 and Mistral.
* Bytes are decimal (1 GB = 1e9 B), FLOPs count a multiply-add as 2.
* Tensor parallelism (TP) of size ``t`` follows Megatron-LM / vLLM: attention heads, MLP columns
  and the vocabulary are split ``t`` ways; norms are replicated; when ``t`` exceeds the number of
  KV heads every rank keeps one KV head, replicated ``t // num_kv_heads`` times.
* A TP decode step does ``2 * num_layers + 1`` all-reduces of the hidden state (embedding,
  attention output, MLP output) plus one all-gather of the vocabulary-parallel logits.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """The shape numbers of a decoder-only transformer (the fields of an HF ``config.json``)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False

    @classmethod
    def preset(cls, name: str) -> ModelShape:
        """One of :data:`MODEL_PRESETS` by name."""
        try:
            return MODEL_PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS)}") from None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any] | str | Path, name: str | None = None) -> ModelShape:
        """Read the shape from a Hugging Face ``config.json`` (a dict or a path to the file)."""
        if not isinstance(config, dict):
            config = json.loads(Path(config).read_text())
        heads = config["num_attention_heads"]
        return cls(
            name=name or config.get("_name_or_path") or config.get("model_type", "model"),
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads", heads),
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
        )


MODEL_PRESETS: dict[str, ModelShape] = {
    "qwen2.5-0.5b": ModelShape(
        name="qwen2.5-0.5b", hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
        num_kv_heads=2, head_dim=64, vocab_size=151936, tie_word_embeddings=True, qkv_bias=True,
    ),
    "llama-7b": ModelShape(
        name="llama-7b", hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, vocab_size=32000,
    ),
    # The shape of the built-in default checkpoint "qwen2-tiny" (hybridpar.models.default_checkpoint).
    "tiny": ModelShape(
        name="tiny", hidden_size=256, intermediate_size=512, num_layers=4, num_heads=8,
        num_kv_heads=4, head_dim=32, vocab_size=2051, tie_word_embeddings=True, qkv_bias=True,
    ),
}


@dataclass(frozen=True)
class HardwareSpec:
    """What one accelerator (or one CPU process) can do per second, and how much it holds."""

    name: str
    memory_bandwidth: float  # bytes/s from device memory
    peak_flops: float  # dense bf16 FLOP/s
    link_bandwidth: float  # bytes/s one rank can send to its peers (one direction)
    link_latency: float  # seconds of fixed cost per collective
    memory_capacity: float  # bytes of device memory

    @classmethod
    def preset(cls, name: str) -> HardwareSpec:
        """One of :data:`HARDWARE_PRESETS` by name."""
        try:
            return HARDWARE_PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown hardware preset {name!r}; choose one of {sorted(HARDWARE_PRESETS)}") from None

    @property
    def ridge_intensity(self) -> float:
        """FLOPs per byte at which a kernel stops being memory-bound (the roofline's ridge point)."""
        return self.peak_flops / self.memory_bandwidth


HARDWARE_PRESETS: dict[str, HardwareSpec] = {
    # Data-sheet numbers of the SXM parts: HBM bandwidth, dense BF16 tensor-core FLOP/s,
    # NVLink 4 (900 GB/s both directions = 450 GB/s each way).
    "h100": HardwareSpec("h100", 3.35e12, 989e12, 450e9, 8e-6, 80e9),
    "h200": HardwareSpec("h200", 4.8e12, 989e12, 450e9, 8e-6, 141e9),
    # A rough small CPU box: two cores, gloo over loopback shared memory.
    "cpu": HardwareSpec("cpu", 20e9, 100e9, 5e9, 50e-6, 24e9),
}


def _check_tp(model: ModelShape, tp_size: int) -> None:
    """Raise ``ValueError`` naming valid sizes if ``tp_size`` cannot shard ``model``."""
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be an int >= 1, got {tp_size!r}")
    valid = [
        t for t in range(1, model.num_heads + 1)
        if model.num_heads % t == 0
        and model.intermediate_size % t == 0
        and (model.num_kv_heads % t == 0 or t % model.num_kv_heads == 0)
    ]
    if tp_size not in valid:
        raise ValueError(
            f"tp_size={tp_size} cannot shard {model.name}: it must divide num_heads={model.num_heads} and "
            f"intermediate_size={model.intermediate_size}, and divide or be a multiple of "
            f"num_kv_heads={model.num_kv_heads}; choose one of {valid}"
        )


def kv_heads_per_rank(model: ModelShape, tp_size: int = 1) -> int:
    """KV heads each TP rank stores: ``num_kv_heads / t``, or 1 (replicated) when ``t > num_kv_heads``."""
    _check_tp(model, tp_size)
    return max(1, model.num_kv_heads // tp_size)


def _layer_params(model: ModelShape, tp_size: int) -> int:
    """Parameters of one decoder layer held by one TP rank (norms replicated)."""
    q = model.num_heads // tp_size * model.head_dim
    kv = kv_heads_per_rank(model, tp_size) * model.head_dim
    attn = model.hidden_size * (q + 2 * kv) + q * model.hidden_size
    if model.qkv_bias:
        attn += q + 2 * kv
    mlp = 3 * model.hidden_size * (model.intermediate_size // tp_size)
    return attn + mlp + 2 * model.hidden_size


def num_params(model: ModelShape, tp_size: int = 1) -> int:
    """Parameters held by one TP rank (``tp_size=1``: the whole model)."""
    vocab_shard = math.ceil(model.vocab_size / tp_size)
    embeddings = (1 if model.tie_word_embeddings else 2) * vocab_shard * model.hidden_size
    return model.num_layers * _layer_params(model, tp_size) + embeddings + model.hidden_size


def unread_embedding_params(model: ModelShape, tp_size: int = 1) -> int:
    """Parameters a decode step stores but does not read: an untied input embedding (one rank's shard).

    Decode looks up one row per token, so the table's bytes are not traffic; a tied table is still
    read in full, as the LM head.
    """
    return 0 if model.tie_word_embeddings else math.ceil(model.vocab_size / tp_size) * model.hidden_size


def weight_bytes(model: ModelShape, tp_size: int = 1, bytes_per_param: float = 2) -> float:
    """Bytes of weights one TP rank stores (bf16 by default)."""
    return num_params(model, tp_size) * bytes_per_param


def kv_token_bytes(num_layers: int, num_kv_heads: int, head_dim: int, bytes_per_elem: float) -> float:
    """The one formula for KV-cache bytes per token: ``2 (K and V) * layers * kv_heads * head_dim * bytes``.

    The roofline, the paged pools (:func:`hybridpar.radix.mem_pool.kv_bytes_per_token`), TKNP's
    memory plan and the benchmarks all size the cache with it.
    """
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_elem


def kv_bytes_per_token(model: ModelShape, tp_size: int = 1, bytes_per_elem: float = 2) -> float:
    """KV-cache bytes one token occupies on one TP rank (:func:`kv_token_bytes` of the rank's KV heads)."""
    return kv_token_bytes(model.num_layers, kv_heads_per_rank(model, tp_size), model.head_dim, bytes_per_elem)


def allreduce_bytes_per_token(model: ModelShape, bytes_per_elem: float = 2) -> float:
    """Payload a TP decode step all-reduces per token: ``(2 * layers + 1) * hidden_size * bytes``.

    This is the size of the tensors handed to all-reduce, independent of the TP size; a ring
    all-reduce makes every rank send ``2 (t - 1) / t`` times this.
    """
    return (2 * model.num_layers + 1) * model.hidden_size * bytes_per_elem


@dataclass(frozen=True)
class DecodeStep:
    """Estimated cost of one decode step (one new token for each of ``batch_size`` requests) on one TP rank."""

    tp_size: int
    batch_size: int
    context_len: int
    weight_bytes: float  # stored per rank
    kv_cache_bytes: float  # stored per rank for batch_size * context_len tokens
    bytes_read: float  # weights of the matmuls + the KV cache, read once per step
    flops: float
    comm_bytes: float  # sent per rank (ring all-reduce + logits all-gather)
    memory_time: float
    compute_time: float
    comm_time: float
    step_time: float  # max(memory_time, compute_time) + comm_time (no overlap)
    fits: bool  # weights + KV cache within the device memory

    @property
    def bound(self) -> str:
        """``"memory"`` or ``"compute"``: which roof limits the step."""
        return "memory" if self.memory_time >= self.compute_time else "compute"

    @property
    def arithmetic_intensity(self) -> float:
        """FLOPs per byte read from memory."""
        return self.flops / self.bytes_read

    @property
    def tokens_per_second(self) -> float:
        """Tokens the whole TP group produces per second (one per request per step)."""
        return self.batch_size / self.step_time


def decode_step_time(
    model: ModelShape,
    hardware: HardwareSpec,
    tp_size: int = 1,
    batch_size: int = 1,
    context_len: int = 1024,
    bytes_per_param: float = 2,
    kv_bytes_per_elem: float = 2,
) -> DecodeStep:
    """Roofline estimate of one decode step with tensor parallelism of size ``tp_size``.

    A decode step reads every matmul weight once and the KV cache of every request once,
    does ``2 * batch * matmul_params`` plus the attention FLOPs, and (for ``tp_size > 1``)
    communicates the hidden state of every token ``2 * layers + 1`` times. Memory and
    compute overlap; communication is added on top, as in plain TP without overlap.
    """
    _check_tp(model, tp_size)
    if batch_size < 1 or context_len < 0:
        raise ValueError(f"batch_size must be >= 1 and context_len >= 0, got {batch_size}, {context_len}")
    t = tp_size
    heads = model.num_heads // t
    stored = weight_bytes(model, t, bytes_per_param)
    not_matmul = unread_embedding_params(model, t) + (2 * model.num_layers + 1) * model.hidden_size  # norms
    matmul_params = num_params(model, t) - not_matmul
    kv_cache = batch_size * context_len * kv_bytes_per_token(model, t, kv_bytes_per_elem)
    bytes_read = matmul_params * bytes_per_param + kv_cache
    attention_flops = 4 * model.num_layers * heads * model.head_dim * context_len
    flops = batch_size * (2 * matmul_params + attention_flops)
    if t > 1:
        ring = 2 * (t - 1) / t * allreduce_bytes_per_token(model, kv_bytes_per_elem)
        gather = (t - 1) / t * model.vocab_size * kv_bytes_per_elem
        comm_bytes = batch_size * (ring + gather)
        comm_time = comm_bytes / hardware.link_bandwidth + (2 * model.num_layers + 2) * hardware.link_latency
    else:
        comm_bytes, comm_time = 0.0, 0.0
    memory_time = bytes_read / hardware.memory_bandwidth
    compute_time = flops / hardware.peak_flops
    return DecodeStep(
        tp_size=t,
        batch_size=batch_size,
        context_len=context_len,
        weight_bytes=stored,
        kv_cache_bytes=kv_cache,
        bytes_read=bytes_read,
        flops=flops,
        comm_bytes=comm_bytes,
        memory_time=memory_time,
        compute_time=compute_time,
        comm_time=comm_time,
        step_time=max(memory_time, compute_time) + comm_time,
        fits=stored + kv_cache <= hardware.memory_capacity,
    )


def attainable_flops(hardware: HardwareSpec, intensity: float) -> float:
    """The roofline: ``min(peak_flops, memory_bandwidth * intensity)``."""
    return min(hardware.peak_flops, hardware.memory_bandwidth * intensity)


def format_bytes(n: float) -> str:
    """``13.5 GB``-style decimal formatting used by the book's tables and widgets."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def format_seconds(s: float) -> str:
    """``12.3 ms``-style formatting."""
    if s == 0:
        return "0 s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(s) >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s * 1e9:.3g} ns"
