"""Built-in checkpoints: one shipped trained model, recipes that hybridpar writes itself, and model-name resolution.

The course must run offline, so nothing is downloaded:

* the default, ``hybridpar/qwen2-tiny``, is a 2.9M-parameter Qwen2 trained on this course's own text
  (:mod:`hybridpar.models.train_tiny`). Its files are package data, in
  ``hybridpar/models/checkpoints/qwen2-tiny-book/``, and :func:`default_model_path` returns that
  directory as it is. Greedy text from it is English lifted from the book;
* every other built-in is a *recipe* (random weights, optionally with a copy circuit, or the shapes of
  a real model for benchmarks), or a re-packing of the shipped model (``qwen2-tiny-sharded``).
  :func:`default_model_path` writes it on first use into a cache directory (``$HYBRIDPAR_CACHE``,
  default ``~/.cache/hybridpar``)::

    <cache>/models/<name>-<spec hash>/
        config.json                 transformers-compatible (Qwen2ForCausalLM, LlamaForCausalLM, ...)
        generation_config.json
        model.safetensors           or model-0000k-of-0000n.safetensors + model.safetensors.index.json
        tokenizer.json              byte-level BPE (256 byte tokens, no merges) + special tokens
        tokenizer_config.json

A built-in checkpoint is then loaded through exactly the same code path as a hub checkpoint
(``config.json`` -> :mod:`hybridpar.models.config`, safetensors -> :mod:`hybridpar.models.loader`)
and by ``transformers.AutoModelForCausalLM.from_pretrained`` for the reference runs.

Invariants:

* Weights are a pure function of (recipe, tensor name): every tensor draws from its own generator,
  seeded from the recipe seed and the tensor name, so a sharded and an unsharded copy of the same
  recipe hold identical tensors (:func:`recipe_tensor`).
* ``qwen2-tiny-copy`` and ``llama-tiny`` wire a small *copy circuit* into layer 0 on top of the random
  weights (see :func:`_copy_circuit`): greedy text repeats the last 8 tokens, with logit gaps large
  enough that bf16 and fp32 pick the same tokens, as with a trained model.
* A recipe built on a shipped checkpoint (``shipped=``) takes its tensors from the shipped files, and
  its directory name hashes their bytes: retraining the default never reuses a stale re-packing.
* Writing is atomic: files go to a temporary sibling directory that is renamed into place, so
  concurrent ranks or processes either see no directory or a complete one.
* The directory name carries a hash of the recipe: changing a recipe never reuses a stale copy.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

BUILTIN_PREFIX = "hybridpar/"
DEFAULT_MODEL = "qwen2-tiny"
_RECIPE_VERSION = 6  # bump when the way tensors are generated changes (6: qwen2-tiny is the shipped trained model)
SHIPPED_ROOT = Path(__file__).resolve().parent / "checkpoints"  # package data: trained checkpoints


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a built-in, nor a usable local directory, nor a reachable hub id."""


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
        ModelSpec("qwen2.5-0.5b-shape",
                  _qwen2_config(151936, 896, 4864, 24, 14, 2, max_pos=32768, rope_theta=1000000.0, eos=_QWEN_EOS,
                                tie=True, dtype="bfloat16"),
                  QWEN_TOKENIZER, dtype="bfloat16", seed=5, num_shards=2,
                  description="Shapes of Qwen2.5-0.5B (494M parameters, ~0.9 GiB), random weights, bf16. For GPU benchmarks.",
                  summary="the shapes of Qwen2.5-0.5B with random weights, for benchmarks; its text is noise"),
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


def builtin_name(model_name: str | None) -> str | None:
    """The registry key for ``None``, ``"qwen2-tiny"`` or ``"hybridpar/qwen2-tiny"``; else ``None``."""
    if model_name is None:
        return DEFAULT_MODEL
    key = model_name[len(BUILTIN_PREFIX):] if model_name.startswith(BUILTIN_PREFIX) else model_name
    return key if key in BUILTIN_MODELS else None


# --------------------------------------------------------------------------- weights
def checkpoint_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor an HF checkpoint of ``config`` stores (Qwen2/Qwen3/Llama)."""
    h, v, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    qkv_bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)
    o_bias = config["model_type"] != "qwen2" and config.get("attention_bias", False)
    mlp_bias = config.get("mlp_bias", False)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for proj, rows in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            shapes[p + f"self_attn.{proj}.weight"] = (rows, h)
            if qkv_bias:
                shapes[p + f"self_attn.{proj}.bias"] = (rows,)
        shapes[p + "self_attn.o_proj.weight"] = (h, heads * hd)
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if config["model_type"] == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
            shapes[p + f"mlp.{proj}.weight"] = shape
            if mlp_bias:
                shapes[p + f"mlp.{proj}.bias"] = shape[:1]
    shapes["model.norm.weight"] = (h,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, h)
    return shapes


def make_tensor(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """The deterministic value of one tensor (drawn on ``device``: a GPU's generator gives other,
    equally distributed values than the CPU's, fast enough for the 7B-shape benchmark models).

    Random weights make a poor language model; these scales keep it from collapsing into
    repeating one token (so greedy generation exercises many decode paths). They do not make the
    logits peaked: for that the tiny recipes add the copy circuit on top (:func:`recipe_tensor`).

    * embedding / LM-head rows: random directions, every row of norm ``0.25 * sqrt(hidden)``
      (equal norms: no token wins just by having a long embedding);
    * q/k projections ~ N(0, 4/fan_in): attention scores are O(1), so a bug in RoPE or in the
      KV-head mapping changes the logits visibly;
    * o/down projections ~ N(0, 16/fan_in): the layers, not the current token's own embedding,
      dominate the residual stream (with tied embeddings the latter predicts "repeat me");
    * other linear weights ~ N(0, 1/fan_in); norm weights ~ 1 + N(0, 0.1^2); biases ~ N(0, 0.1^2).
    """
    gen = torch.Generator(device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    x = torch.randn(shape, generator=gen, dtype=torch.float32, device=device)
    if name.endswith("norm.weight"):
        x = 1.0 + 0.1 * x
    elif name.endswith(".bias"):
        x = 0.1 * x
    elif "embed_tokens" in name or name == "lm_head.weight":
        x = x / x.norm(dim=1, keepdim=True) * (0.25 * shape[1] ** 0.5)
    else:
        gain = {"q_proj": 2.0, "k_proj": 2.0, "o_proj": 4.0, "down_proj": 4.0}.get(name.split(".")[-2], 1.0)
        x = x * (gain * shape[-1] ** -0.5)
    return x.to(dtype)


# The copy circuit. Random weights give flat, Gaussian-like logits: their top-2 gaps are often far
# below the ~1% relative noise of bf16, so bf16 and fp32 (or two bf16 kernels) soon pick different
# greedy tokens. Trained models have peaked logits. The tiny recipes therefore wire one readable
# circuit into layer 0 and keep every other weight random:
#
# * embeddings: e_t = [A, r_t, 0...]: a constant channel 0 and a random direction r_t (norm RHO) in
#   the D = kv_heads * head_dim "copy" channels 1..D (untied LM heads: the same rows + 10% noise);
# * layer-0 q and k read only the constant channel, so they are the same vector for every token:
#   with RoPE the score depends on the distance alone, and the k phases put its peak (margin of
#   several units) at distance period-1. Every head attends to the token period-1 back;
# * v copies channels 1..D (KV head g takes block g), o writes them back scaled by COPY, so the last
#   hidden state is dominated by r of the token period-1 back, and the (tied) LM head predicts it.
#
# Greedy generation therefore repeats the last ``period`` tokens ("France is" -> "rance isrance is"),
# with top-2 logit gaps of several units, while the random layers still perturb every logit (any
# bug in attention, RoPE, KV heads or sharding changes them far beyond 1e-4).
_A, _RHO, _COPY, _SCORE, _RANDOM_SCALE = 1.0, 2.0, 6.0, 64.0, 0.5


def _copy_circuit(spec: ModelSpec, name: str, x: torch.Tensor) -> torch.Tensor:
    """Rewire the float32 tensor ``x`` (``make_tensor``'s value of ``name``) for ``spec``'s copy circuit."""
    from hybridpar.models.config import RopeConfig
    from hybridpar.models.rotary import inverse_frequencies

    cfg = spec.config
    h, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or h // heads
    d = kv * hd
    if d + 1 > h:
        raise ValueError(f"copy circuit needs kv_heads * head_dim < hidden_size for recipe {spec.name}")
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        base = x if name == "model.embed_tokens.weight" else \
            make_tensor("model.embed_tokens.weight", tuple(x.shape), spec.seed, torch.float32, x.device)
        r = base[:, :d] / base[:, :d].norm(dim=1, keepdim=True) * _RHO
        if name == "lm_head.weight":
            r = r + 0.1 * _RHO * x[:, :d] / x[:, :d].norm(dim=1, keepdim=True)
        e = torch.zeros_like(x)
        e[:, 0], e[:, 1:1 + d] = _A, r
        return e
    if not name.startswith("model.layers."):
        return x
    if not name.startswith("model.layers.0.self_attn."):
        return x * _RANDOM_SCALE if name.endswith("proj.weight") else x
    proj, kind = name.split(".")[-2:]
    if kind == "bias":
        return torch.zeros_like(x)
    sc = cfg.get("rope_scaling") or {}
    rope = RopeConfig(theta=cfg["rope_theta"], rope_type=sc.get("rope_type", "default"), factor=sc.get("factor", 1.0),
                      low_freq_factor=sc.get("low_freq_factor", 1.0), high_freq_factor=sc.get("high_freq_factor", 4.0),
                      original_max_position_embeddings=sc.get("original_max_position_embeddings",
                                                              cfg["max_position_embeddings"]))
    inv_freq = inverse_frequencies(rope, hd)
    pairs = [i for i in range(hd // 2) if inv_freq[i] >= 0.005]
    w0 = make_tensor("model.layers.0.input_layernorm.weight", (h,), spec.seed, torch.float32)[0].item()
    kappa = _A / ((_A ** 2 + _RHO ** 2) / h + cfg["rms_norm_eps"]) ** 0.5 * w0  # channel 0 after the norm
    amp = (_SCORE * hd ** 0.5 / len(pairs)) ** 0.5  # |q pair| = |k pair|: score per pair = amp^2 / sqrt(hd)
    w = torch.zeros_like(x)
    if proj == "q_proj":
        for head in range(heads):
            for i in pairs:
                w[head * hd + i, 0] = amp / kappa
    elif proj == "k_proj":  # k pair = q pair rotated by freq * (period - 1): scores peak at that distance
        for g in range(kv):
            for i in pairs:
                angle = float(inv_freq[i]) * (spec.copy_period - 1)
                w[g * hd + i, 0] = amp * math.cos(angle) / kappa
                w[g * hd + i + hd // 2, 0] = amp * math.sin(angle) / kappa
    elif proj == "v_proj":
        for g in range(kv):
            for i in range(hd):
                w[g * hd + i, 1 + g * hd + i] = 1.0
    else:  # o_proj: the query heads of KV group g write block g back, summing to COPY * r (pre-norm scale)
        group = heads // kv
        pre_norm = (h / (_A ** 2 + _RHO ** 2)) ** 0.5
        for head in range(heads):
            g = head // group
            for i in range(hd):
                w[1 + g * hd + i, head * hd + i] = _COPY / group / pre_norm
    return w


def recipe_tensor(spec: ModelSpec, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The value of checkpoint tensor ``name`` of recipe ``spec`` (random, plus the copy circuit if any;
    read from the shipped files for a recipe built on a shipped checkpoint)."""
    if spec.shipped_dir is not None:
        from safetensors import safe_open

        with safe_open(str(spec.shipped_dir / "model.safetensors"), framework="pt") as f:
            x = f.get_tensor(name)
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"shipped tensor {name} has shape {tuple(x.shape)}, the config says {tuple(shape)}")
        return x.to(device=device, dtype=dtype)
    x = make_tensor(name, shape, spec.seed, torch.float32, device)
    if spec.copy_period is not None:
        x = _copy_circuit(spec, name, x)
    return x.to(dtype)


def _write_weights(spec: ModelSpec, out: Path) -> None:
    from safetensors.torch import save_file

    dtype = getattr(torch, spec.dtype)
    shapes = checkpoint_tensor_shapes(spec.config)
    names = list(shapes)
    if spec.num_shards == 1:
        save_file({n: recipe_tensor(spec, n, shapes[n], dtype) for n in names},
                  str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    # Balance shards by bytes, keeping the checkpoint's tensor order.
    sizes = [torch.Size(shapes[n]).numel() for n in names]
    target = sum(sizes) / spec.num_shards
    groups: list[list[str]] = [[]]
    acc = 0
    for n, size in zip(names, sizes):
        if acc >= target * len(groups) and len(groups) < spec.num_shards:
            groups.append([])
        groups[-1].append(n)
        acc += size
    weight_map: dict[str, str] = {}
    total = 0
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: recipe_tensor(spec, n, shapes[n], dtype) for n in group}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer(spec: TokenizerSpec):
    """A byte-level BPE ``tokenizers.Tokenizer``: one token per byte, no merges, plus special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special_tokens])
    if spec.add_bos:
        bos = spec.bos_token
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, spec.token_id(bos))])
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _write_tokenizer(spec: ModelSpec, out: Path) -> None:
    if spec.shipped_dir is not None:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copyfile(spec.shipped_dir / name, out / name)
        return
    t = spec.tokenizer
    build_tokenizer(t).save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": t.eos_token, "bos_token": t.bos_token, "pad_token": t.eos_token,
        "add_bos_token": t.add_bos, "clean_up_tokenization_spaces": False,
        "model_max_length": spec.config["max_position_embeddings"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


# --------------------------------------------------------------------------- writing / resolving
def cache_root() -> Path:
    """``$HYBRIDPAR_CACHE`` or ``~/.cache/hybridpar``."""
    return Path(os.environ.get("HYBRIDPAR_CACHE") or Path.home() / ".cache" / "hybridpar").expanduser()


def write_checkpoint(spec: ModelSpec, out: Path) -> Path:
    """Write ``spec`` into the (existing, empty) directory ``out``; returns ``out``."""
    config = copy.deepcopy(spec.config)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    eos = config["eos_token_id"]
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "do_sample": False}
    if spec.shipped_dir is not None:
        gen = json.loads((spec.shipped_dir / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    _write_tokenizer(spec, out)
    _write_weights(spec, out)
    (out / "hybridpar_recipe.json").write_text(json.dumps(
        {"name": spec.name, "hash": spec.hash(), "description": spec.description}, indent=2))
    return out


def default_model_path(arch: str = "qwen2", size: str = "tiny", name: str | None = None) -> Path:
    """Path of a built-in checkpoint, written on first use.

    ``name`` (e.g. ``"llama-tiny"``, ``"qwen2.5-0.5b-shape"``) wins over ``arch``/``size``
    (``default_model_path("llama")`` is ``"llama-tiny"``). Safe under concurrency: the checkpoint is
    written into a temporary directory and renamed into place; a process that loses the race
    discards its copy.
    """
    key = name or f"{arch}-{size}"
    if key not in BUILTIN_MODELS:
        raise ModelNotFoundError(
            f"no built-in model {key!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[key]
    if spec.shipped_dir is not None:
        missing = [f for f in _SHIPPED_FILES if not (spec.shipped_dir / f).is_file()]
        if missing:
            raise ModelNotFoundError(
                f"the built-in {key!r} is shipped as package data in {str(spec.shipped_dir)!r}, but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: reinstall hybridpar (its wheel "
                f"must include hybridpar/models/checkpoints/), or retrain it with "
                f"'python -m hybridpar.models.train_tiny' from a repository checkout")
        if spec.num_shards == 1:
            return spec.shipped_dir  # the shipped files as they are
    final = cache_root() / "models" / f"{spec.name}-{spec.hash()}"
    if (final / "hybridpar_recipe.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        write_checkpoint(spec, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its complete copy first
            if not (final / "hybridpar_recipe.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def describe_model(model_name: str | None = None) -> str:
    """One line for the demos: the model's name and what it is (``"hybridpar/qwen2-tiny, a 2.9M-parameter
    Qwen2 trained on this book; ..."``). Reads config.json only for a local directory or hub id."""
    key = builtin_name(model_name)
    if model_name is not None and Path(model_name).expanduser().exists():  # a shipped directory is its built-in
        local = Path(model_name).expanduser().resolve()
        key = next((name for name, spec in BUILTIN_MODELS.items()
                    if spec.shipped_dir == local and spec.num_shards == 1), None)
    if key is not None:
        spec = BUILTIN_MODELS[key]
        return f"{BUILTIN_PREFIX}{key}, {spec.summary or spec.description}"
    from hybridpar.models.config import ModelConfig

    try:
        cfg = ModelConfig.from_pretrained(resolve_model(model_name))
    except Exception:  # noqa: BLE001 - a description never fails a demo
        return str(model_name)
    return (f"{model_name}, a {format_count(cfg.num_parameters())}-parameter {cfg.architecture} checkpoint "
            f"({cfg.num_layers} layers, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads)")


def format_count(n: int) -> str:
    """2_888_704 -> '2.9M', 494_032_768 -> '494M', 6_738_415_616 -> '6.7B'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return str(n)


_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]


def check_checkpoint_dir(path: Path) -> Path:
    """Raise :class:`ModelNotFoundError` naming what is missing unless ``path`` is a loadable checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"checkpoint directory {str(path)!r} does not exist; pass an existing local "
                                 f"directory, a hub id, or model_name=None for the built-in 'hybridpar/{DEFAULT_MODEL}'")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{str(path)!r} has no config.json; a checkpoint directory needs config.json "
                                 f"and *.safetensors weights (Hugging Face format)")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" It has only pickle weights ({', '.join(pickles)}); hybridpar never loads pickle: convert them "
                f"to safetensors (e.g. transformers' save_pretrained(safe_serialization=True)).") if pickles else ""
        raise ModelNotFoundError(f"{str(path)!r} has no *.safetensors weight file.{hint}")
    return path


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model(model_name: str | None = None) -> Path:
    """Turn ``model_name`` into a local checkpoint directory.

    * ``None``, ``"qwen2-tiny"``, ``"hybridpar/llama-tiny"``, ...: a built-in, written on first use;
    * an existing local directory: checked (config.json and safetensors present) and returned;
    * otherwise a hub id (``"Qwen/Qwen2.5-0.5B"``): downloaded with huggingface_hub (json, safetensors
      and tokenizer files only; never pickle, never remote code). Offline (``HF_HUB_OFFLINE=1`` or no
      network) only the local hub cache is used; a miss raises :class:`ModelNotFoundError` that names
      the built-in default.
    """
    key = builtin_name(model_name)
    if model_name is not None:
        local = Path(model_name).expanduser()
        if local.exists() or model_name.startswith(("/", ".", "~")) or model_name.count("/") > 1:
            return check_checkpoint_dir(local)
    if key is not None:
        return default_model_path(name=key)
    assert model_name is not None
    if model_name.count("/") != 1:
        raise ModelNotFoundError(
            f"model {model_name!r} is not an existing directory, not a built-in model ({', '.join(BUILTIN_MODELS)}) "
            f"and not a hub id of the form 'org/name'; use model_name=None for the built-in 'hybridpar/{DEFAULT_MODEL}'")
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    try:
        path = snapshot_download(model_name, allow_patterns=_DOWNLOAD_PATTERNS, local_files_only=offline)
    except Exception as exc:  # offline miss, no network, unknown repo, gated repo, ...
        why = "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local hub cache" if offline \
            else f"it could not be downloaded ({type(exc).__name__}: {exc})"
        raise ModelNotFoundError(
            f"model {model_name!r} is not available: {why}. Use model_name=None for the built-in "
            f"'hybridpar/{DEFAULT_MODEL}' (written locally, no network), another built-in "
            f"({', '.join(BUILTIN_MODELS)}), or a local checkpoint directory.") from exc
    return check_checkpoint_dir(Path(path))
