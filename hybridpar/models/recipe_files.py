"""The files of a recipe checkpoint: its tensors, its tokenizer, its config (written by :func:`write_checkpoint`).

A recipe (:class:`~hybridpar.models.builtin_models.ModelSpec`) says what a built-in checkpoint
is; this module turns it into ``config.json``, ``generation_config.json``, the tokenizer files and
safetensors. Weights are a pure function of (recipe, tensor name): every tensor draws from its own
generator, so a sharded and an unsharded copy of the same recipe hold identical tensors
(:func:`recipe_tensor`). :func:`~hybridpar.models.default_checkpoint.default_model_path` calls
:func:`write_checkpoint` into a temporary directory that it then renames into place.
"""
from __future__ import annotations

import copy
import json
import math
import shutil
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hybridpar.models.moe_config import is_sparse_layer, moe_tensor_shapes

if TYPE_CHECKING:
    from hybridpar.models.default_checkpoint import ModelSpec, TokenizerSpec

# --------------------------------------------------------------------------- weights
def checkpoint_tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor an HF checkpoint of ``config`` stores (Qwen2/Qwen3/Llama)."""
    h, v, inter = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // heads
    qwen2 = config["model_type"] in ("qwen2", "qwen2_moe")
    qkv_bias = config.get("qkv_bias", True) if qwen2 else config.get("attention_bias", False)
    o_bias = not qwen2 and config.get("attention_bias", False)
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
        if is_sparse_layer(config, i):
            shapes.update(moe_tensor_shapes(config, p))
            continue
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
