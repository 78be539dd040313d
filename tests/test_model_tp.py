"""The tensor-parallel decoder computes what transformers computes (CPU, gloo, fp32).

One launch of 4 ranks covers TP 4, 2 and 1 (the groups are re-initialised in between) on the
built-in Qwen2 (the trained default: GQA 8/4 heads, QKV bias, tied embeddings, vocab 2051), Llama
(8/4 heads, untied, llama3 RoPE), at TP 2 Qwen3 (q/k norm, head_dim 32) and at TP 4 the copy-circuit
Qwen2 (GQA 4/2 heads: TP 4 replicates its 2 KV heads, biases included); the transformers reference
runs once, here in the parent. Vocabularies of 2051 and 259 divide by neither 2 nor 4.
"""
from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hybridpar.distributed.launcher import launch  # noqa: E402
from hybridpar.models.default_checkpoint import default_model_path  # noqa: E402
from hybridpar.models.verify import FP32_ATOL, compare, hf_reference  # noqa: E402
from tests.model_workers import tp_sweep  # noqa: E402

TP_SIZES = [4, 2, 1]
MODEL_TP = {"qwen2": TP_SIZES, "llama": TP_SIZES, "qwen3": [2], "qwen2_copy": [4]}
EXTRA_TP = [4, 2]  # load statistics and shard reports
GENERATION_TP = [2]  # batching, sampling, EOS, full and index.json loading
NEW_TOKENS = 32
TEXTS = ["The capital of France is", "def f(x):", "Tensor parallelism splits every weight matrix over the ranks of a group",
         "Hi"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    from transformers import AutoTokenizer

    # Built-ins come from the shared cache (written once per machine); the damaged copy is ours.
    paths = {"qwen2": default_model_path(name="qwen2-tiny"), "llama": default_model_path(name="llama-tiny"),
             "qwen3": default_model_path(name="qwen3-tiny"), "qwen2_copy": default_model_path(name="qwen2-tiny-copy"),
             "qwen2_sharded": default_model_path(name="qwen2-tiny-sharded")}
    truncated = tmp_path_factory.mktemp("damaged") / "truncated"
    shutil.copytree(paths["qwen2"], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    paths["truncated"] = truncated
    models, refs = {}, {}
    for name in MODEL_TP:
        tok = AutoTokenizer.from_pretrained(str(paths[name]))
        refs[name] = hf_reference(paths[name], [tok(t).input_ids for t in TEXTS], NEW_TOKENS)
        models[name] = {"path": str(paths[name]), "prompts": refs[name].prompts,
                        "continuations": refs[name].continuations, "tp_sizes": MODEL_TP[name]}
    results = launch(tp_sweep, 4, TP_SIZES, models,
                     {k: str(v) for k, v in paths.items()}, EXTRA_TP, GENERATION_TP, backend="gloo",
                     timeout=600)
    return refs, results


@pytest.mark.parametrize("name,tp", [(name, tp) for name, sizes in MODEL_TP.items() for tp in sizes])
def test_logits_and_greedy_tokens_match_transformers(sweep, name, tp):
    refs, results = sweep
    got = results[0][tp][name]
    assert len({len(p) for p in refs[name].prompts}) == len(TEXTS), "prompts must have unequal lengths"
    m = compare(refs[name], got["logits"], got["tokens"])
    assert m["prefill_max_abs"] <= FP32_ATOL, m
    assert m["decode_max_abs"] <= FP32_ATOL, m
    assert m["greedy_match"] == NEW_TOKENS, (got["tokens"], refs[name].continuations)
    # Sanity of the reference itself: the built-in model does not just repeat one token.
    assert max(len(set(c)) for c in refs[name].continuations) >= 3


@pytest.mark.parametrize("tp", GENERATION_TP)
def test_ragged_batch_equals_one_by_one_and_sampling_is_seeded(sweep, tp):
    ex = sweep[1][0][tp]["extras"]
    assert ex["batch_greedy"] == ex["alone_greedy"]
    assert ex["batch_sampled"] == ex["alone_sampled"] == ex["batch_sampled_again"]
    assert ex["batch_sampled"] != ex["other_seed_sampled"]
    assert ex["batch_sampled"] != ex["batch_greedy"]
    for rank_results in sweep[1]:  # every rank chose the same tokens
        assert rank_results[tp]["extras"]["batch_sampled"] == ex["batch_sampled"]


@pytest.mark.parametrize("tp", GENERATION_TP)
def test_generation_stops_at_eos(sweep, tp):
    ex = sweep[1][0][tp]["extras"]
    greedy, eos = ex["batch_greedy"][0], ex["eos"]["eos"]
    first = greedy.index(eos)
    assert ex["eos"]["tokens"] == greedy[: first + 1]
    assert ex["eos"]["finish_reason"] == "eos"


def test_sharded_loading_reads_a_fraction_of_the_checkpoint(sweep):
    results = sweep[1]
    stats = {tp: [r[tp]["extras"]["load_stats"] for r in results] for tp in EXTRA_TP}
    total = stats[2][0]["full"]["checkpoint_bytes"]
    for tp in EXTRA_TP:
        for s in stats[tp]:
            assert s["full"]["bytes_read"] == total  # load-then-shard: every rank reads everything
            assert s["sharded"]["checkpoint_bytes"] == total
        print(f"tp={tp}: bytes read per rank, sharded {[s['sharded']['bytes_read'] for s in stats[tp]]} "
              f"vs full {total}")
    assert max(s["sharded"]["bytes_read"] for s in stats[2]) <= 0.6 * total
    assert max(s["sharded"]["bytes_read"] for s in stats[4]) <= 0.35 * total
    # Together the ranks read every tensor at least once.
    assert sum(s["sharded"]["bytes_read"] for s in stats[4]) >= total


def test_full_load_and_index_json_checkpoint_give_the_same_model(sweep):
    for tp in GENERATION_TP:
        ex = sweep[1][0][tp]["extras"]
        assert ex["full_greedy"] == ex["batch_greedy"]
        assert ex["index_greedy"] == ex["batch_greedy"]
        assert ex["index_files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


def test_truncated_safetensors_error_names_the_file_and_the_fix(sweep):
    msg = sweep[1][0][2]["extras"]["truncated_error"]
    assert msg is not None and "model.safetensors" in msg and "truncated" in msg and "download" in msg


@pytest.mark.parametrize("tp", EXTRA_TP)
def test_rank_reports_show_each_ranks_shards(sweep, tp):
    reports = [r[tp]["extras"]["report"] for r in sweep[1]][:tp]  # one TP group
    assert [r.tp_rank for r in reports] == list(range(tp))
    assert all(r.q_heads == 8 // tp and r.kv_heads == 4 // tp for r in reports)  # 8 query / 4 KV heads
    rows = [r.vocab_rows for r in reports]
    assert rows[0][0] == 0 and all(a[1] == b[0] for a, b in zip(rows, rows[1:])) and rows[-1][1] >= 2051
    full = reports[0].full_model_parameters
    assert all(r.num_parameters < full for r in reports)
    assert sum(r.num_parameters for r in reports) >= full
    qkv = [t for t in reports[0].tensors if t.name == "model.layers.0.self_attn.qkv_proj.weight"][0]
    assert qkv.split == "column" and qkv.local_shape == [(8 // tp + 2 * (4 // tp)) * 32, 256]
