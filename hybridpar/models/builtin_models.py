"""The built-in models: recipes (tokenizer and config of each) and the shipped trained checkpoint's spec.

:mod:`hybridpar.models.default_checkpoint` resolves names to directories and writes a recipe's files
on first use (:mod:`hybridpar.models.recipe_files` makes the tensors); this module only says what
each built-in is. Add a model here: a :class:`ModelSpec` in :data:`BUILTIN_MODELS`.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUILTIN_PREFIX = "hybridpar/"
DEFAULT_MODEL = "qwen2-tiny"
_RECIPE_VERSION = 6  # bump when the way tensors are generated changes (6: qwen2-tiny is the shipped trained model)
SHIPPED_ROOT = Path(__file__).resolve().parent / "checkpoints"  # package data: trained checkpoints


# --------------------------------------------------------------------------- recipes
@dataclass(frozen=True)
class TokenizerSpec:
    """A byte-level tokenizer: ids 0..255 are the bytes, then ``special_tokens`` in order."""

    special_tokens: tuple[str, ...]
    eos_token: str
    bos_token: str | None = None
    add_bos: bool = False  # prepend bos_token to every encoded text (Llama-3 style)

    def token_id(self, token: str) -> int:
        return 256 + self.special_tokens.index(token)


QWEN_TOKENIZER = TokenizerSpec(("<|endoftext|>", "<|im_start|>", "<|im_end|>"), eos_token="<|endoftext|>")
LLAMA_TOKENIZER = TokenizerSpec(
    ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"),
    eos_token="<|end_of_text|>", bos_token="<|begin_of_text|>", add_bos=True,
)


@dataclass(frozen=True)
class ModelSpec:
    """Recipe of one built-in checkpoint: a config.json, a tokenizer and a weight generator."""

    name: str
    config: dict[str, Any]
    tokenizer: TokenizerSpec | None  # None: the shipped checkpoint's own tokenizer files
    dtype: str = "float32"  # storage dtype of the safetensors files
    seed: int = 0
    num_shards: int = 1  # > 1 writes model.safetensors.index.json
    copy_period: int | None = None  # wire a copy circuit (see _copy_circuit); None: purely random weights
    description: str = ""
    summary: str = ""  # a few words for the demos: what this model is and what its text looks like
    shipped: str | None = None  # directory under SHIPPED_ROOT holding the trained files
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def shipped_dir(self) -> Path | None:
        return None if self.shipped is None else SHIPPED_ROOT / self.shipped

    def hash(self) -> str:
        tokenizer = None if self.tokenizer is None else self.tokenizer.__dict__
        shipped = None if self.shipped_dir is None else _files_digest(self.shipped_dir)
        blob = json.dumps([_RECIPE_VERSION, self.name, self.config, tokenizer, self.dtype,
                           self.seed, self.num_shards, self.copy_period, shipped], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


_SHIPPED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "model.safetensors")


@functools.lru_cache(maxsize=None)
def _files_digest(directory: Path) -> str:
    """sha256 over the shipped files of ``directory`` (missing files hash as empty)."""
    h = hashlib.sha256()
    for name in _SHIPPED_FILES:
        f = directory / name
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b""))
    return h.hexdigest()


def _shipped_config(directory: str) -> dict[str, Any]:
    """The ``config.json`` of a shipped checkpoint ({} if the package data is missing: resolving it then
    raises :class:`ModelNotFoundError`, which says so)."""
    f = SHIPPED_ROOT / directory / "config.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def _qwen2_config(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, *,
                  max_pos: int, rope_theta: float, eos: int, tie: bool, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "hidden_act": "silu", "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta, "rope_scaling": None, "tie_word_embeddings": tie,
        "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": eos, "eos_token_id": eos, "torch_dtype": dtype,
    }


def _llama_config(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, *,
                  head_dim: int, max_pos: int, rope_theta: float, rope_scaling: dict | None,
                  bos: int, eos: int | list[int], dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "hidden_act": "silu", "max_position_embeddings": max_pos, "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta, "rope_scaling": rope_scaling, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "pretraining_tp": 1,
        "initializer_range": 0.02, "use_cache": True, "bos_token_id": bos, "eos_token_id": eos,
        "torch_dtype": dtype,
    }


_QWEN_EOS = QWEN_TOKENIZER.token_id("<|endoftext|>")
_LLAMA_BOS = LLAMA_TOKENIZER.token_id("<|begin_of_text|>")
_LLAMA_EOS = [LLAMA_TOKENIZER.token_id("<|end_of_text|>"), LLAMA_TOKENIZER.token_id("<|eot_id|>")]
# llama3 scaling with a short original context and rope_theta=50, so that head_dim=8 hits all three
# frequency bands of the llama3 rule (wavelengths 6.3 and 16.7 kept, 44 smoothed, 118 divided by the
# factor) and still has enough fast frequencies for a sharp positional attention head.
_TINY_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                        "high_freq_factor": 4.0, "original_max_position_embeddings": 100}

_QWEN2_TINY = _qwen2_config(259, 64, 128, 2, 4, 2, max_pos=512, rope_theta=10000.0, eos=_QWEN_EOS,
                            tie=True, dtype="float32")
_QWEN3_TINY = {
    **_qwen2_config(259, 64, 128, 2, 4, 2, max_pos=512, rope_theta=1000000.0, eos=_QWEN_EOS, tie=True,
                    dtype="float32"),
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32, "attention_bias": False,
}

_QWEN2_MOE_TINY = {
    **_qwen2_config(259, 64, 128, 2, 4, 2, max_pos=512, rope_theta=10000.0, eos=_QWEN_EOS, tie=True,
                    dtype="float32"),
    "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "qkv_bias": True,
    "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64,
    "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
    "output_router_logits": False,
}

_BOOK = "qwen2-tiny-book"
_BOOK_CONFIG = _shipped_config(_BOOK)

BUILTIN_MODELS: dict[str, ModelSpec] = {
    spec.name: spec for spec in [
        ModelSpec("qwen2-tiny", _BOOK_CONFIG, None, shipped=_BOOK,
                  description="Qwen2 architecture trained on this course's text (hybridpar.models.train_tiny): "
                              "4 layers, hidden 256, 8 query / 4 KV heads (GQA), QKV bias, tied embeddings, "
                              "byte-level BPE vocabulary of 2051 (not a multiple of 2 or 4) with a ChatML chat "
                              "template; fp32, 2.9M parameters, shipped as package data. The default.",
                  summary="a 2.9M-parameter Qwen2 trained on this book; it continues a prompt with sentences "
                          "from the course"),
        ModelSpec("qwen2-tiny-sharded", _BOOK_CONFIG, None, shipped=_BOOK, num_shards=2,
                  description="qwen2-tiny split over 2 safetensors files + model.safetensors.index.json "
                              "(same tensors as qwen2-tiny).",
                  summary="the trained qwen2-tiny, split over two safetensors files"),
        ModelSpec("qwen2-tiny-copy", _QWEN2_TINY, QWEN_TOKENIZER, seed=1234, copy_period=8,
                  description="Qwen2 architecture, 2 layers, hidden 64, 4 query / 2 KV heads (GQA: TP 4 replicates "
                              "the KV heads), QKV bias, tied embeddings, byte vocabulary of 259; fp32; random "
                              "weights plus a copy circuit (greedy text repeats the last 8 tokens). The default "
                              "before the trained qwen2-tiny.",
                  summary="a 2-layer Qwen2 with random weights plus a copy circuit; it repeats the last 8 "
                          "bytes, it does not write English"),
        ModelSpec("llama-tiny", _llama_config(261, 64, 160, 2, 8, 4, head_dim=8, max_pos=512, rope_theta=50.0,
                                              rope_scaling=_TINY_LLAMA3_SCALING, bos=_LLAMA_BOS, eos=_LLAMA_EOS,
                                              dtype="float32"),
                  LLAMA_TOKENIZER, seed=4321, copy_period=8,
                  description="Llama architecture, 2 layers, hidden 64, 8 query / 4 KV heads, head_dim 8, untied, "
                              "no bias, llama3 rope scaling, two EOS ids, BOS prepended; fp32; copy circuit.",
                  summary="a 2-layer Llama with random weights plus a copy circuit; it repeats the last 8 "
                          "bytes, it does not write English"),
        ModelSpec("qwen3-tiny", _QWEN3_TINY, QWEN_TOKENIZER, seed=777,
                  description="Qwen3 architecture (q/k RMSNorm), head_dim 32 != hidden/heads, tied; fp32.",
                  summary="a 2-layer Qwen3 with random weights; its text is noise"),
        ModelSpec("qwen2-moe-tiny", _QWEN2_MOE_TINY, QWEN_TOKENIZER, seed=1616, copy_period=8,
                  description="Qwen2-MoE architecture, 2 layers, hidden 64, 4 query / 2 KV heads, QKV bias, tied; "
                              "every layer sparse: 8 experts (intermediate 32), top-2 without renormalisation "
                              "(norm_topk_prob=false, as Qwen1.5-MoE), a shared expert (intermediate 64) with its "
                              "sigmoid gate; fp32; random weights plus the copy circuit.",
                  summary="a 2-layer Qwen2-MoE (8 experts, top-2, a shared expert) with random weights plus a copy "
                          "circuit; it repeats the last 8 bytes"),
        ModelSpec("qwen1.5-moe-a2.7b-shape",
                  {**_qwen2_config(151936, 2048, 5632, 24, 16, 16, max_pos=8192, rope_theta=1000000.0, eos=_QWEN_EOS,
                                   tie=False, dtype="bfloat16"),
                   "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", "qkv_bias": True,
                   "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                   "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "decoder_sparse_step": 1,
                   "mlp_only_layers": []},
                  QWEN_TOKENIZER, dtype="bfloat16", seed=15, num_shards=8,
                  description="Shapes of Qwen1.5-MoE-A2.7B (14.3B parameters, 2.7B active per token, ~27 GiB), "
                              "random weights, bf16. For GPU benchmarks.",
                  summary="the shapes of Qwen1.5-MoE-A2.7B with random weights, for benchmarks; its text is noise"),
        ModelSpec("qwen2.5-0.5b-shape",
                  _qwen2_config(151936, 896, 4864, 24, 14, 2, max_pos=32768, rope_theta=1000000.0, eos=_QWEN_EOS,
                                tie=True, dtype="bfloat16"),
                  QWEN_TOKENIZER, dtype="bfloat16", seed=5, num_shards=2,
                  description="Shapes of Qwen2.5-0.5B (494M parameters, ~0.9 GiB), random weights, bf16. For GPU benchmarks.",
                  summary="the shapes of Qwen2.5-0.5B with random weights, for benchmarks; its text is noise"),
        ModelSpec("qwen3-0.6b-shape",
                  {**_qwen2_config(151936, 1024, 3072, 28, 16, 8, max_pos=40960, rope_theta=1000000.0,
                                   eos=_QWEN_EOS, tie=True, dtype="bfloat16"),
                   "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 128,
                   "attention_bias": False},
                  QWEN_TOKENIZER, dtype="bfloat16", seed=6, num_shards=2,
                  description="Shapes of Qwen3-0.6B (596M parameters, ~1.1 GiB, GQA 16/8), random weights, bf16. "
                              "For GPU benchmarks (nano-vllm's throughput benchmark uses this model).",
                  summary="the shapes of Qwen3-0.6B with random weights, for benchmarks; its text is noise"),
        ModelSpec("llama-7b-shape",
                  _llama_config(32000, 4096, 11008, 32, 32, 32, head_dim=128, max_pos=4096, rope_theta=10000.0,
                                rope_scaling=None, bos=_LLAMA_BOS, eos=_LLAMA_EOS, dtype="bfloat16"),
                  LLAMA_TOKENIZER, dtype="bfloat16", seed=7, num_shards=7,
                  description="Shapes of Llama-2-7B (6.7B parameters, ~12.6 GiB), random weights, bf16. For GPU benchmarks.",
                  summary="the shapes of Llama-2-7B with random weights, for benchmarks; its text is noise"),
        ModelSpec("llama3-8b-shape",
                  _llama_config(128256, 4096, 14336, 32, 32, 8, head_dim=128, max_pos=131072, rope_theta=500000.0,
                                rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                bos=_LLAMA_BOS, eos=_LLAMA_EOS, dtype="bfloat16"),
                  LLAMA_TOKENIZER, dtype="bfloat16", seed=8, num_shards=8,
                  description="Shapes of Llama-3.1-8B (8.0B parameters, ~15 GiB, GQA 32/8), random weights, bf16.",
                  summary="the shapes of Llama-3.1-8B with random weights, for benchmarks; its text is noise"),
    ]
}
