"""Built-in checkpoints, model-name resolution, config handling, RoPE, loader errors, sampling, the
attention seam. All in-process (no ranks spawned)."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hybridpar.distributed.parallel_state import ParallelConfigError  # noqa: E402
from hybridpar.models.attention_backend import ContiguousKVCache, ForwardBatch, ForwardMode  # noqa: E402
from hybridpar.models.config import ModelConfig, UnsupportedArchitectureError, check_tp_size  # noqa: E402
from hybridpar.models.default_checkpoint import (  # noqa: E402
    BUILTIN_MODELS,
    QWEN_TOKENIZER,
    ModelNotFoundError,
    ModelSpec,
    default_model_path,
    resolve_model,
)
from hybridpar.models.recipe_files import checkpoint_tensor_shapes  # noqa: E402
from hybridpar.models.loader import CorruptCheckpointError, LoadStats, iter_checkpoint  # noqa: E402
from hybridpar.models.rotary import inverse_frequencies  # noqa: E402
from hybridpar.models.sampling import SamplingParams, filtered_probs, sample  # noqa: E402


# Built-in checkpoints live in the ordinary cache (HYBRIDPAR_CACHE or ~/.cache/hybridpar): they are
# written once per machine and recipe, atomically, so tests share them. Tests of first use get their
# own empty cache.


@pytest.fixture(scope="module")
def qwen2() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def llama() -> Path:
    return default_model_path("llama")


# --------------------------------------------------------------------------- built-in checkpoints
def test_default_checkpoint_is_a_hard_qwen2_case_that_transformers_loads(qwen2):
    """The default is the shipped, trained checkpoint: GQA, QKV bias, tied embeddings, an odd vocabulary."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    assert {p.name for p in qwen2.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                 "tokenizer_config.json", "generation_config.json"}
    hf = AutoConfig.from_pretrained(qwen2)
    assert hf.architectures == ["Qwen2ForCausalLM"] and hf.tie_word_embeddings
    assert hf.num_attention_heads > hf.num_key_value_heads  # GQA
    assert hf.vocab_size % 2 and hf.vocab_size % 4  # vocabulary that no TP size divides
    model = AutoModelForCausalLM.from_pretrained(qwen2)
    assert model.model.layers[0].self_attn.q_proj.bias is not None  # QKV bias
    cfg = ModelConfig.from_pretrained(qwen2)
    assert cfg.num_parameters() == sum(p.numel() for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(qwen2)
    text = "Grüße, 世界! <|im_end|>"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text and ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and max(ids) < hf.vocab_size
    # Special tokens of the other Qwen built-ins; both end-of-document and end-of-turn stop generation.
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token_id == cfg.eos_token_ids[0] == 0 and cfg.eos_token_ids == (0, 2)
    assert len(tok("Tensor parallelism splits every weight matrix").input_ids) <= 8  # BPE learned the book's words
    assert qwen2 == default_model_path() and qwen2.parent.name == "checkpoints"  # package data, not the cache


def _greedy(path, ids, n):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


def test_default_model_writes_the_books_english(qwen2):
    """Greedy continuations of course-like prompts are made of the book's words (a random model's BPE
    pieces are not), and the chat template answers glossary questions with the glossary's definition."""
    import re

    from transformers import AutoTokenizer

    from hybridpar.models.book_corpus import book_corpus, glossary_entries
    from hybridpar.models.train_tiny import TinyRecipe

    tok = AutoTokenizer.from_pretrained(qwen2)
    docs, _ = book_corpus(TinyRecipe())
    book_words = set(re.findall(r"[A-Za-z]+", " ".join(docs)))
    for prompt in ("Tensor parallelism splits", "A radix tree", "The root rank"):
        text = tok.decode(_greedy(qwen2, tok(prompt).input_ids, 24), skip_special_tokens=True)
        words = re.findall(r"[A-Za-z]+", text)
        assert len(words) >= 8 and sum(w in book_words for w in words) >= 0.9 * len(words), (prompt, text)
    glossary = dict(glossary_entries((Path(__file__).resolve().parents[1] / "glossary.md").read_text()))
    for term, question in (("KV cache", "What is a KV cache?"), ("radix tree", "What is a radix tree?")):
        ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
        answer = tok.decode(_greedy(qwen2, ids, 24), skip_special_tokens=True)
        assert answer.split()[:8] == glossary[term].split()[:8], (question, answer)


@pytest.mark.parametrize(("name", "prompt"), [("qwen2", "Tensor parallelism splits"),
                                              ("llama", "The capital of France is")])
def test_builtin_logits_are_peaked_enough_for_bf16(name, prompt, request):
    """transformers' own greedy decoding of the built-in model picks the same 16 tokens in bf16 as in
    fp32: the trained model's logits on a prompt from its book, and the copy circuit's on any prompt,
    are peaked enough for the bf16 GPU check. (On a prompt far from the book, such as the one given to
    llama-tiny, the trained model's CPU bf16 tokens part from fp32 after 8 tokens.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = request.getfixturevalue(name)
    ids = AutoTokenizer.from_pretrained(path)(prompt, return_tensors="pt").input_ids
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype)
        with torch.no_grad():
            out[dtype] = model.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out[torch.float32].tolist() == out[torch.bfloat16].tolist()
    assert len(set(out[torch.float32][0, ids.shape[1]:].tolist())) >= 3  # not one repeated token


def test_llama_variant_is_untied_with_llama3_rope_and_bos(llama):
    from transformers import AutoConfig, AutoTokenizer
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = ModelConfig.from_pretrained(llama)
    assert cfg.architecture == "LlamaForCausalLM" and not cfg.tie_word_embeddings and not cfg.qkv_bias
    assert cfg.rope.rope_type == "llama3" and len(cfg.eos_token_ids) == 2
    tok = AutoTokenizer.from_pretrained(llama)
    assert tok("hi").input_ids[0] == cfg.bos_token_id
    hf = AutoConfig.from_pretrained(llama)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = inverse_frequencies(cfg.rope, cfg.head_dim)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # The tiny config reaches all three llama3 bands: kept, smoothed and divided by the factor.
    default = inverse_frequencies(type(cfg.rope)(theta=cfg.rope.theta), cfg.head_dim)
    ratio = default / ours
    assert ratio.min() == 1.0 and ratio.max() == pytest.approx(cfg.rope.factor)
    assert ((ratio > 1.0) & (ratio < cfg.rope.factor - 1e-3)).any()


def test_qwen3_config_has_qk_norm_and_explicit_head_dim():
    cfg = ModelConfig.from_pretrained(default_model_path("qwen3"))
    assert cfg.qk_norm and cfg.head_dim * cfg.num_heads != cfg.hidden_size


def test_recipes_are_deterministic_and_sharded_copy_is_identical(qwen2):
    from safetensors.torch import load_file

    sharded = default_model_path(name="qwen2-tiny-sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    merged = {}
    for f in sorted(sharded.glob("*.safetensors")):
        merged.update(load_file(f))
    single = load_file(qwen2 / "model.safetensors")
    assert merged.keys() == single.keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)


def test_concurrent_first_use_writes_one_complete_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDPAR_CACHE", str(tmp_path))
    # A random-weight recipe of the 2-layer qwen2-tiny-copy's shape (cheap to write four times at once).
    spec = ModelSpec("test-random-qwen2", BUILTIN_MODELS["qwen2-tiny-copy"].config, QWEN_TOKENIZER, seed=1)
    monkeypatch.setitem(BUILTIN_MODELS, spec.name, spec)
    paths: list[Path] = []
    threads = [threading.Thread(target=lambda: paths.append(default_model_path(name=spec.name))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1
    assert [p.name for p in (tmp_path / "models").iterdir()] == [paths[0].name]  # no temporary leftovers
    assert (paths[0] / "model.safetensors").stat().st_size > 0


def test_builtin_registry_has_realistic_shapes():
    shapes = {name: spec.config for name, spec in BUILTIN_MODELS.items()}
    q = shapes["qwen2.5-0.5b-shape"]
    assert (q["hidden_size"], q["num_hidden_layers"], q["num_attention_heads"], q["num_key_value_heads"],
            q["vocab_size"]) == (896, 24, 14, 2, 151936)
    assert shapes["llama-7b-shape"]["hidden_size"] == 4096 and BUILTIN_MODELS["llama-7b-shape"].dtype == "bfloat16"
    # Parameter counts of the real models (tied embeddings counted once), without writing any file.
    for name, params in (("qwen2.5-0.5b-shape", 494_032_768), ("llama-7b-shape", 6_738_415_616),
                         ("llama3-8b-shape", 8_030_261_248)):
        assert sum(torch.Size(s).numel() for s in checkpoint_tensor_shapes(shapes[name]).values()) == params


# --------------------------------------------------------------------------- resolving names
def test_resolve_model_names(qwen2, tmp_path):
    assert resolve_model(None) == qwen2 == resolve_model("hybridpar/qwen2-tiny") == resolve_model(str(qwen2))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "empty"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(qwen2 / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFoundError, match="never loads pickle"):
        resolve_model(str(pickled))
    with pytest.raises(ModelNotFoundError, match="not a hub id"):
        resolve_model("no-such-model")


def test_hub_id_offline_names_the_builtin_default(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError, match=r"offline.*model_name=None.*'hybridpar/qwen2-tiny'"):
        resolve_model("Qwen/Qwen2.5-0.5B")


# --------------------------------------------------------------------------- config errors
def test_unsupported_architecture_is_named_with_the_supported_ones(qwen2, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(qwen2, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError) as err:
        ModelConfig.from_pretrained(bad)
    msg = str(err.value)
    assert "GPT2LMHeadModel" in msg and "Qwen2ForCausalLM" in msg and "LlamaForCausalLM" in msg


def test_tp_size_that_does_not_fit_the_heads(qwen2):
    cfg = ModelConfig.from_pretrained(qwen2)  # 8 query heads, 4 KV heads
    for tp in (1, 2, 4, 8):
        check_tp_size(cfg, tp)
    with pytest.raises(ParallelConfigError, match="valid tensor_parallel_size values are 1, 2, 4, 8"):
        check_tp_size(cfg, 3)
    with pytest.raises(ParallelConfigError):
        check_tp_size(cfg, 16)
    copy = ModelConfig.from_pretrained(default_model_path(name="qwen2-tiny-copy"))  # 4 query heads, 2 KV heads
    with pytest.raises(ParallelConfigError, match="valid tensor_parallel_size values are 1, 2, 4"):
        check_tp_size(copy, 8)


def test_run_demo_rejects_bad_tp_before_spawning(qwen2):
    from hybridpar.demos.tp_generate import run_demo
    from hybridpar.models.shard_report import inspect_tp

    with pytest.raises(ParallelConfigError, match="tensor_parallel_size=3"):
        run_demo(tp_size=3, model_name=str(qwen2))
    with pytest.raises(ParallelConfigError, match="tensor_parallel_size=16"):
        inspect_tp(str(qwen2), tp_size=16)


# --------------------------------------------------------------------------- loader errors
@pytest.mark.parametrize("damage", ["truncate", "garbage_header", "tiny"])
def test_corrupt_safetensors_names_the_file(qwen2, tmp_path, damage):
    bad = tmp_path / "bad"
    shutil.copytree(qwen2, bad)
    f = bad / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"truncate": data[:-100], "garbage_header": data[:8] + b"\xff" * 64 + data[72:],
                   "tiny": data[:4]}[damage])
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors.*(truncated|corrupt)"):
        list(iter_checkpoint(bad, LoadStats("sharded")))


# --------------------------------------------------------------------------- sampling
def test_top_k_and_top_p_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert (probs > 0).tolist() == [True, True, False, False, False]
    full = torch.softmax(logits, -1)
    p = float(full[0] + full[1]) - 1e-4  # needs the first two tokens, not the third
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=p))
    assert (probs > 0).tolist() == [True, True, False, False, False]
    assert probs.sum().item() == pytest.approx(1.0)
    probs = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=1e-6))
    assert (probs > 0).tolist() == [True, False, False, False, False]


def test_sampling_is_seeded_and_greedy_is_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=1.5, seed=s) for s in (1, 2, 3)]
    draw = [sample(logits, params, [p.make_generator() for p in params]) for _ in range(2)]
    assert draw[0] == draw[1]
    many = [sample(logits[:1], params[:1], [torch.Generator().manual_seed(s)])[0] for s in range(20)]
    assert len(set(many)) > 1
    assert sample(logits, [SamplingParams()] * 3, [torch.Generator()] * 3) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_k": -2}, {"top_p": 0.0}, {"max_new_tokens": 0}])
def test_bad_sampling_params_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


# --------------------------------------------------------------------------- the attention seam
def test_extend_after_prefill_equals_one_prefill():
    """EXTEND (new tokens after a cached prefix) attends exactly like one PREFILL of the whole sequence."""
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, n = 4, 2, 8, 11
    q, k, v = (torch.randn(n, h, d, generator=g) for h in (hq, hkv, hkv))
    whole = ContiguousKVCache(1, hkv, d, max_batch_size=2, max_seq_len=16)
    rows = whole.alloc(1)
    fb = ForwardBatch.build(whole, rows, [0], [n])
    assert fb.forward_mode == ForwardMode.PREFILL
    ref = whole.forward(0, q, k, v, fb)
    split = ContiguousKVCache(1, hkv, d, max_batch_size=2, max_seq_len=16)
    rows = split.alloc(1)
    first = split.forward(0, q[:6], k[:6], v[:6], ForwardBatch.build(split, rows, [0], [6]))
    fb = ForwardBatch.build(split, rows, [6], [3])
    assert fb.forward_mode == ForwardMode.EXTEND and fb.positions.tolist() == [6, 7, 8]
    second = split.forward(0, q[6:9], k[6:9], v[6:9], fb)
    fb = ForwardBatch.build(split, rows, [9], [1])
    assert fb.forward_mode == ForwardMode.DECODE
    third = split.forward(0, q[9:10], k[9:10], v[9:10], fb)
    torch.testing.assert_close(torch.cat([first, second, third]), ref[:10])
    # Naive causal attention with KV head h // 2 for query head h.
    scores = torch.einsum("qhd,khd->hqk", q, k.repeat_interleave(2, dim=1)) * d ** -0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    naive = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.repeat_interleave(2, dim=1))
    torch.testing.assert_close(ref, naive)
