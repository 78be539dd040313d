"""RadixAttention serving: paged backend, TP pool sync, schedule policy, TPScheduler, workload, demo.

Pure pieces are tested in this process. The model runs in two launches (TP 1 and TP 2, gloo), each
serving the same requests under many configurations; the parent compares every output with
transformers' greedy continuation of the same checkpoint.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from hybridpar.distributed.launcher import launch
from hybridpar.models.attention_backend import ForwardBatch, ForwardMode
from hybridpar.core import SamplingParams
from hybridpar.radix import (
    MHATokenToKVPool,
    RadixCache,
    ReqToTokenPool,
    TokenToKVPoolAllocator,
)
from hybridpar.radix.allocation import alloc_for_decode, alloc_for_extend, start_req
from hybridpar.radix.paged_backend import RadixAttentionBackend
from hybridpar.radix.pool_sync import (
    PoolDivergenceError,
    RecordingReqToTokenPool,
    RecordingTokenToKVPoolAllocator,
    pool_digest,
    replay,
)
from hybridpar.radix.schedule_policy import AddResult, InBatchPrefixFilter, PrefillAdder, SchedulePolicy
from hybridpar.core import ServeReq
from hybridpar.config import ServerArgs
from hybridpar.radix.workload import SharedPrefixWorkload, theoretical_hit_rate
from tests import radix_serving_workers as workers
from tests.torchrun_util import run_under_torchrun

ROOT = Path(__file__).resolve().parents[1]
WORKLOAD = SharedPrefixWorkload(num_groups=3, prompts_per_group=4, system_len=32, question_len=8, output_len=4)


# ------------------------------------------------------------------ paged attention backend
def _dense(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """Reference causal GQA attention written out: q [n, Hq, d] over a history [L, Hkv, d]."""
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    scores = torch.einsum("nhd,lhd->hnl", q, keys) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.arange(len(keys))[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), values)


def test_backend_reads_cached_prefixes_and_new_tokens_in_mixed_batches():
    ps, hq, hkv, d, layers = 4, 4, 2, 8, 2
    pool = ReqToTokenPool(4, 64)
    alloc = TokenToKVPoolAllocator(64, ps)
    kv = MHATokenToKVPool(64, ps, torch.float64, hkv, d, layers)
    backend = RadixAttentionBackend(pool, kv, check_reads=True)
    gen = torch.Generator().manual_seed(0)
    hist: dict[int, list[torch.Tensor]] = {}  # row -> per-layer [L, 2, Hkv, d] K/V the row's request has seen

    def step(rows: list[int], prefix: list[int], new: list[int]) -> ForwardMode:
        fresh = alloc.alloc_extend(prefix, [p + n for p, n in zip(prefix, new)],
                                   [int(pool.req_to_token[r, p - 1]) if p else -1 for r, p in zip(rows, prefix)])
        start = 0
        for r, p, n in zip(rows, prefix, new):
            pool.write(r, p, fresh[start:start + n])
            start += n
        t = sum(new)
        fb = ForwardBatch.build(backend, rows, prefix, new, out_cache_loc=fresh)
        backend.init_forward_metadata(fb)
        for layer in range(layers):
            q, k, v = (torch.randn(t, h, d, generator=gen, dtype=torch.float64) for h in (hq, hkv, hkv))
            got = backend.forward(layer, q, k, v, fb)
            start = 0
            for r, p, n in zip(rows, prefix, new):
                seen = hist.setdefault(r, [torch.empty(0, 2, hkv, d, dtype=torch.float64)] * layers)
                seen[layer] = torch.cat([seen[layer][:p], torch.stack([k[start:start + n], v[start:start + n]], 1)])
                want = _dense(q[start:start + n], seen[layer][:, 0], seen[layer][:, 1], torch.arange(p, p + n))
                torch.testing.assert_close(got[start:start + n], want, rtol=1e-10, atol=1e-10)
                start += n
        return fb.forward_mode

    assert step([0], [0], [6]) == ForwardMode.PREFILL  # request A: 6 tokens
    # request B reuses A's first page (a radix hit): its row points at A's slots
    pool.write(1, 0, pool.req_to_token[0, :4].to(torch.int64))
    hist[1] = [h[:4] for h in hist[0]]
    # one batch: A decodes a token, B extends its hit by 3, C prefills 5
    assert step([0, 1, 2], [6, 4, 0], [1, 3, 5]) == ForwardMode.EXTEND
    assert step([0, 1, 2], [7, 7, 5], [1, 1, 1]) == ForwardMode.DECODE
    assert int(backend.filled.sum()) == 8 + 4 + 6  # tokens whose K/V were written: A, B (beyond its hit), C


def test_backend_refuses_to_read_a_slot_that_was_never_written():
    pool, alloc = ReqToTokenPool(2, 16), TokenToKVPoolAllocator(32, 4)
    backend = RadixAttentionBackend(pool, MHATokenToKVPool(32, 4, torch.float32, 1, 4, 1), check_reads=True)
    slots = alloc.alloc(8)
    pool.write(0, 0, slots[:5])  # positions 0..3 claim a prefix nobody computed
    fb = ForwardBatch.build(backend, [0], [4], [1], out_cache_loc=slots[4:5])
    with pytest.raises(RuntimeError, match="never written"):
        backend.init_forward_metadata(fb)
    with pytest.raises(ValueError, match="out_cache_loc"):
        backend.init_forward_metadata(ForwardBatch.build(backend, [0], [0], [5]))


# ------------------------------------------------------------------ pool record / replay
def test_replay_reproduces_rank0_pools_and_catches_divergence():
    ops: list = []
    pool = RecordingReqToTokenPool(3, 64, "cpu", ops)
    alloc = RecordingTokenToKVPoolAllocator(48, 4, "cpu", ops)
    cache = RadixCache(pool, alloc)
    reqs = [ServeReq(i, list(range(10)) + [i] * (3 + i)) for i in range(3)]
    for req in reqs:
        assert start_req(cache, req)
        alloc_for_extend(cache, [req], [len(req.all_ids) - req.kv_len])
        req.output_ids.append(7)
        cache.cache_unfinished_req(req)
    for _ in range(3):
        alloc_for_decode(cache, reqs)
        for req in reqs:
            req.output_ids.append(5)
    for req in reqs[:2]:
        cache.cache_finished_req(req)
    assert cache.evict(4) >= 4
    names = [op[0] for op in ops]
    assert {"rows.alloc", "rows.write", "rows.free", "kv.alloc_extend", "kv.alloc_decode", "kv.free"} <= set(names)
    assert names.count("kv.alloc_decode") == 3 and names.count("kv.alloc_extend") == 3  # outermost calls only

    mirror_pool, mirror_alloc = ReqToTokenPool(3, 64), TokenToKVPoolAllocator(48, 4)
    replay(ops, mirror_pool, mirror_alloc)
    filled = torch.zeros(52, dtype=torch.bool)
    assert pool_digest(mirror_pool, mirror_alloc, filled) == pool_digest(pool, alloc, filled)

    diverged = TokenToKVPoolAllocator(48, 4)
    diverged.alloc(4)  # this "rank" handed out a page rank 0 never did
    with pytest.raises(PoolDivergenceError, match="diverged"):
        replay(ops, ReqToTokenPool(3, 64), diverged)


# ------------------------------------------------------------------ schedule policy
def _cache(page_size: int = 4, num_pages: int = 64, rows: int = 8) -> RadixCache:
    return RadixCache(ReqToTokenPool(rows, 128), TokenToKVPoolAllocator(num_pages * page_size, page_size))


def _req(rid: int, ids: list[int], max_new: int = 4) -> ServeReq:
    return ServeReq(rid, list(ids), sampling=SamplingParams(max_new_tokens=max_new), arrival_seq=rid)


def _cache_prompt(cache: RadixCache, ids: list[int]) -> None:
    req = _req(99, ids)
    assert start_req(cache, req)
    alloc_for_extend(cache, [req], [len(ids) - req.kv_len])
    cache.cache_finished_req(req)


def test_lpm_serves_the_longest_cached_prefix_first_and_fcfs_keeps_arrival_order():
    cache = _cache()
    system = list(range(100, 116))
    _cache_prompt(cache, system + [1])
    waiting = [_req(0, [7] * 20), _req(1, system[:8] + [9] * 9), _req(2, system + [3, 4]), _req(3, [8] * 5)]
    SchedulePolicy("lpm", cache).calc_priority(waiting)
    assert [r.rid for r in waiting] == [2, 1, 0, 3]
    clock, nodes = cache._clock, len(list(cache.nodes()))
    assert [cache.prefix_len(r.all_ids) for r in waiting] == [16, 8, 0, 0]
    assert (cache._clock, len(list(cache.nodes()))) == (clock, nodes)  # no LRU stamp, no split
    assert cache.match_prefix(system[:8] + [9] * 9).prefix_len == 8 and len(list(cache.nodes())) == nodes + 1
    random.Random(0).shuffle(waiting)
    SchedulePolicy("fcfs", cache).calc_priority(waiting)
    assert [r.rid for r in waiting] == [0, 1, 2, 3]


def _held_back(in_batch: InBatchPrefixFilter, waiting: list[ServeReq]) -> set[int]:
    """Walk ``waiting`` as the scheduler does, admitting everyone not held back."""
    held = set()
    for req in waiting:
        if in_batch.holds_back(req):
            held.add(req.rid)
        else:
            in_batch.admit(req)
    return held


def test_in_batch_filter_computes_an_uncached_shared_prefix_once():
    shared = list(range(50, 90))  # 40 tokens, not cached
    waiting = [_req(0, shared + [1]), _req(1, shared + [2, 2]), _req(2, [5] * 12), _req(3, shared + [3])]
    assert _held_back(InBatchPrefixFilter(_cache()), waiting) == {1, 3}
    assert _held_back(InBatchPrefixFilter(_cache(), deprioritize_threshold=48), waiting) == set()
    cache = _cache()
    _cache_prompt(cache, shared[:8] + [9])  # 8 of the 40 tokens cached (a chunk so far): the batch still gains 32
    assert _held_back(InBatchPrefixFilter(cache), waiting) == {1, 3}
    assert _held_back(InBatchPrefixFilter(cache, deprioritize_threshold=33), waiting) == set()
    cache = _cache()
    _cache_prompt(cache, shared + [9])  # once it is cached, sharing it in the batch gains nothing
    assert _held_back(InBatchPrefixFilter(cache), waiting) == set()


def test_prefill_adder_respects_rows_memory_prefill_budget_and_chunks():
    cache = _cache(num_pages=8, rows=2)  # 32 tokens
    a, b, c = _req(0, [1] * 10), _req(1, [2] * 10), _req(2, [3] * 10)
    adder = PrefillAdder(cache, [], new_token_ratio=0.5, max_prefill_tokens=100, chunked_prefill_size=None)
    assert adder.add_one_req(a) is AddResult.CONTINUE  # 3 pages + reserve 2
    assert adder.add_one_req(b) is AddResult.CONTINUE  # budget 32 - 12 - 2 = 18 >= 12 + 2
    assert adder.add_one_req(c) is AddResult.NO_ROW
    assert adder.extend_lens == [10, 10] and torch.cat(adder.out_cache_loc).numel() == 20
    cache.check_integrity([a, b])

    cache = _cache(num_pages=4, rows=4)  # 16 tokens
    a, b = _req(0, [1] * 10), _req(1, [2] * 3)
    adder = PrefillAdder(cache, [], new_token_ratio=1.0, max_prefill_tokens=100, chunked_prefill_size=None)
    assert adder.add_one_req(a) is AddResult.CONTINUE  # alone: only its 3 pages must fit
    assert adder.add_one_req(b) is AddResult.NO_TOKEN  # 4 free - 4 reserved for a's decode < 4 + 4
    assert b.req_pool_idx is None and b.kv_len == 0  # released: waits with nothing held
    cache.check_integrity([a])

    cache = _cache()
    long, short = _req(0, [4] * 30), _req(1, [5] * 10)
    adder = PrefillAdder(cache, [], new_token_ratio=0.5, max_prefill_tokens=12, chunked_prefill_size=None)
    assert adder.add_one_req(long) is AddResult.CONTINUE  # a lone long request still runs
    assert adder.add_one_req(short) is AddResult.BUDGET
    adder = PrefillAdder(cache, [], new_token_ratio=0.5, max_prefill_tokens=100, chunked_prefill_size=10)
    chunky = _req(2, [6] * 30)
    assert adder.add_one_req(chunky) is AddResult.CHUNKED
    assert adder.new_chunked_req is chunky and chunky.kv_len == 8  # whole pages of the 10-token budget
    cache.check_integrity([long, chunky])


# ------------------------------------------------------------------ workload and arguments
def test_shared_prefix_workload_shares_exactly_the_system_prompt():
    reqs = WORKLOAD.requests()
    assert len(reqs) == 12 and all(len(r.prompt_ids) == 40 and r.max_new_tokens == 4 for r in reqs)
    by_group = {g: [r.prompt_ids for r in reqs if r.group == g] for g in range(3)}
    assert len({p[0] for p in (ps[0] for ps in by_group.values())}) == 3  # groups differ at token 0
    for prompts in by_group.values():
        assert all(p[:32] == prompts[0][:32] for p in prompts)
        assert len({p[32] for p in prompts}) == 4  # questions differ at their first token
    shuffled = WORKLOAD.requests(shuffle=True)
    assert shuffled != reqs and sorted(map(str, shuffled)) == sorted(map(str, reqs))
    assert shuffled == WORKLOAD.requests(shuffle=True)  # seeded
    assert theoretical_hit_rate(3, 4, 32, 8, page_size=16) == 3 * 32 / (4 * 40)
    assert theoretical_hit_rate(3, 4, 30, 8, page_size=16) == 3 * 16 / (4 * 38)  # whole pages only
    with pytest.raises(ValueError, match="prompts_per_group"):
        SharedPrefixWorkload(2, 0, 8, 8, 8)


def test_server_args_reject_bad_values_with_the_fix():
    with pytest.raises(ValueError, match="schedule_policy must be one of"):
        ServerArgs(schedule_policy="random")
    with pytest.raises(ValueError, match="max_total_tokens must be an int >= 16"):
        ServerArgs(max_total_tokens=8)
    with pytest.raises(ValueError, match="chunked_prefill_size"):
        ServerArgs(chunked_prefill_size=4)


# ------------------------------------------------------------------ the model, TP 1 and TP 2
def _requests() -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts sharing prefixes in every way (duplicates, a prefix of another, one token) + their sampling."""
    rng = random.Random(0)
    toks = lambda n: [rng.randrange(256) for _ in range(n)]  # noqa: E731
    system, other = toks(20), toks(13)
    q1, q2 = toks(7), toks(12)
    prompts = [system + q1, system + q2, system + q1, other + toks(5), system[:9], system + q2 + toks(9), [5],
               toks(33), system + toks(3), system + q1]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=i % 2 == 0)
              for i, n in enumerate([8, 10, 6, 12, 8, 9, 5, 7, 11])]
    params.append(SamplingParams(max_new_tokens=9, temperature=0.8, top_p=0.9, seed=7))  # seeded sampling
    return prompts, params


@pytest.fixture(scope="module")
def reference() -> list[list[int] | None]:
    """transformers' greedy tokens for each greedy request (cut after EOS unless it ignores EOS); None if sampled."""
    from hybridpar.models.config import ModelConfig
    from hybridpar.models.default_checkpoint import resolve_model
    from hybridpar.models.verify import hf_reference

    path = resolve_model(None)
    prompts, params = _requests()
    eos = set(ModelConfig.from_pretrained(path).eos_token_ids)
    conts = hf_reference(path, prompts, max(p.max_new_tokens for p in params)).continuations
    expected: list[list[int] | None] = []
    for cont, p in zip(conts, params):
        cont = cont[:p.max_new_tokens]
        stop = next((i for i, t in enumerate(cont) if t in eos), None)
        expected.append(None if not p.greedy else cont if p.ignore_eos or stop is None else cont[:stop + 1])
    return expected


@pytest.fixture(scope="module")
def runs() -> dict[int, list[dict]]:
    prompts, params = _requests()
    return {1: launch(workers.serving_scenarios, 1, prompts, params, workload=WORKLOAD, backend="gloo", timeout=300),
            2: launch(workers.serving_scenarios, 2, prompts, params, backend="gloo", timeout=300)}


SCENARIOS = ["radix", "radix_page16", "no_cache", "fcfs", "chunked", "one_by_one", "pressure", "sequential",
             "after_rejection"]


@pytest.mark.parametrize("tp", [1, 2])
def test_outputs_equal_transformers_and_generate_in_every_scenario(runs, reference, tp):
    per_rank = runs[tp]
    generated = per_rank[0]["generate"]
    assert [g for g, r in zip(generated, reference) if r is not None] == [r for r in reference if r is not None]
    assert sorted(per_rank[0]["outputs"]) == sorted(SCENARIOS)
    for name in SCENARIOS:  # greedy: token-identical to transformers; seeded sampling: to generate
        assert per_rank[0]["outputs"][name] == generated, name
    for other in per_rank[1:]:  # every rank returns the same results
        assert other["outputs"] == per_rank[0]["outputs"]


@pytest.mark.parametrize("tp", [1, 2])
def test_scheduler_behaviour_under_each_configuration(runs, tp):
    out = runs[tp][0]
    m = out["metrics"]
    assert m["radix"]["cached_prompt_tokens"] > 0 and m["no_cache"]["cached_prompt_tokens"] == 0
    assert m["radix"]["prefill_tokens_computed"] < m["no_cache"]["prefill_tokens_computed"]
    assert m["sequential"]["cached_prompt_tokens"] > 0
    assert m["chunked"]["prefill_steps"] > m["radix"]["prefill_steps"]
    assert out["notes"]["prefill_joined_running_batch"]
    pressure = m["pressure"]
    assert pressure["evicted_tokens"] > 0 and pressure["preemptions"] > 0 and out["notes"]["waited_while_decoding"]
    assert "could never run" in out["notes"]["rejected"] and "max_total_tokens" in out["notes"]["rejected"]
    assert all(mm["finished_requests"] == len(_requests()[0]) for mm in m.values())


def test_every_rank_ends_with_the_same_pool_state(runs):
    ranks = runs[2]
    full = runs[1][0]["kv_heads_per_rank"]  # TP 1 holds every KV head; each TP 2 rank holds its half
    assert full >= 2 and [r["kv_heads_per_rank"] for r in ranks] == [full // 2] * 2
    for name in SCENARIOS:
        digest = ranks[0]["digests"][name]
        assert digest["num_filled"] > 0 and len(digest["free_rows"]) == 64, name  # every row returned
        assert ranks[1]["digests"][name] == digest, name


def test_hit_rate_reaches_the_theoretical_maximum_under_lpm(runs):
    out = runs[1][0]
    best = WORKLOAD.theoretical_hit_rate(page_size=16)
    assert best == pytest.approx(3 * 32 / (4 * 40))
    assert out["hit_rate"]["ordered"] == pytest.approx(best, abs=1e-12)
    assert out["hit_rate"]["shuffled"] == pytest.approx(best, abs=1e-12)
    assert out["hit_rate"]["ordered_fcfs"] < best  # FCFS, the plain baseline: group mates prefilled together
    assert out["hit_rate"]["ordered_long_queue"] == pytest.approx(best, abs=1e-12)  # LPM in arrival order
    assert out["hit_rate"]["ordered_chunked"] == pytest.approx(best, abs=1e-12)  # group mates wait for the chunks
    assert out["hit_rate"]["shuffled_no_in_batch"] < best  # group mates prefilled together
    assert out["notes"]["workload_matches_generate"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tp2_on_nccl_matches_generate_and_keeps_the_pools_in_sync():
    prompts, params = _requests()
    ranks = launch(workers.serving_scenarios, 2, prompts, params, workload=WORKLOAD, backend="nccl", timeout=300)
    out = ranks[0]
    for name in SCENARIOS:
        assert out["outputs"][name] == out["generate"], name
        assert ranks[1]["digests"][name] == out["digests"][name], name
    assert out["hit_rate"]["shuffled"] == pytest.approx(WORKLOAD.theoretical_hit_rate(page_size=16), abs=1e-12)
    assert out["notes"]["workload_matches_generate"]


# ------------------------------------------------------------------ demo
DEMO_ARGS = ["--groups", "2", "--prompts-per-group", "3", "--system-len", "32", "--question-len", "8",
             "--output-len", "4", "--no-compare"]


def test_demo_under_torchrun_prints_outputs_and_the_theoretical_hit_rate():
    proc = run_under_torchrun(2, "-m", "hybridpar.demos.radix_demo", "--force-cpu", "--model-name", "qwen2-tiny",
                              *DEMO_ARGS, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("== RadixAttention under tensor parallelism ==") == 1  # rank 0 only
    assert "hybridpar/qwen2-tiny, a 2.9M-parameter Qwen2 trained on this book" in out
    assert "TP 2 on cpu: 6 requests" in out and "prompts: English system prompts and questions" in out
    outputs = [line for line in out.splitlines() if line.startswith("  group ")]
    assert len(outputs) == 6 and not any("\ufffd" in line or "\\x" in line for line in outputs)  # text, not bytes
    assert "cache hit rate        0.533   (theoretical max 0.533; 128 of 240 prompt tokens)" in out
    assert "prefill tokens        112 computed" in out and "output tok/s" in out
    assert "verdict:   radix cache on: 53 % of prompt tokens reused (the best possible here is 53 %)." in out


def test_demo_text_prompts_keep_the_workload_guarantees():
    """The English prompts have the workload's exact lengths and arrival order; groups share nothing and
    the prompts of a group exactly their system prompt, so the theoretical hit rate still holds."""
    from transformers import AutoTokenizer

    from hybridpar.demos.radix_demo import text_requests
    from hybridpar.models.default_checkpoint import resolve_model

    for name in ("qwen2-tiny", "llama-tiny"):  # BPE and byte-level (with a BOS that must not be used)
        tok = AutoTokenizer.from_pretrained(str(resolve_model(name)))
        encode = lambda text: list(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
        workload = SharedPrefixWorkload(4, 4, 64, 16, 16)
        reqs = text_requests(workload, encode)
        assert [(r.group, r.index) for r in reqs] == [(r.group, r.index) for r in workload.requests(shuffle=True)]
        assert all(len(r.prompt_ids) == 80 and r.max_new_tokens == 16 for r in reqs)
        for a in reqs:
            for b in reqs:
                shared = next((i for i, (x, y) in enumerate(zip(a.prompt_ids, b.prompt_ids)) if x != y), 80)
                assert shared == (80 if a is b else 64 if a.group == b.group else 0)
        first = next(r for r in reqs if r.index == 0)
        assert tok.decode(first.prompt_ids[64:]).strip().startswith("How many collect")  # QUESTIONS[0], cut to 16
    assert text_requests(SharedPrefixWorkload(9, 2, 8, 4, 1), encode) is None  # more groups than texts


def test_demo_verdict_says_whether_reuse_paid_off():
    from hybridpar.demos.radix_demo import DemoReport, radix_verdict

    def report(device, on, off):
        metrics = {"cache_hit_rate": 0.6, "prefill_tokens_computed": 512, "total_tokens_per_s": on}
        return DemoReport(2, "qwen2-tiny", device, 16, 0.6, metrics,
                          {"prefill_tokens_computed": 1280, "total_tokens_per_s": off}, [])

    slow = radix_verdict(report("cpu", 900.0, 1000.0))
    assert slow.startswith("radix cache on: 60 % of prompt tokens reused (the best possible here is 60 %); 512 prefill")
    assert "0.90x the throughput" in slow and "on the CPU the tiny model's prefill is too cheap" in slow
    assert "chapter 7" in slow
    fast = radix_verdict(report("cuda:0", 1400.0, 1000.0))
    assert "1.40x the throughput of the cache-off run: the reuse pays off." in fast


def test_demo_from_a_notebook_and_bad_tp_before_spawning(capsys):
    from hybridpar.demos.radix_demo import main, run_demo

    report = run_demo(tp=1, backend="gloo", workload=SharedPrefixWorkload(2, 2, 32, 8, 2), compare=True)
    assert report.metrics["cache_hit_rate"] == pytest.approx(report.theoretical_hit_rate) == 0.4
    assert report.baseline["cache_hit_rate"] == 0.0 and len(report.outputs) == 4 and report.prompts == "text"
    with pytest.raises(SystemExit) as exc:
        main(["--tp", "3", *DEMO_ARGS])
    assert exc.value.code == 2 and "tensor_parallel_size" in capsys.readouterr().err
