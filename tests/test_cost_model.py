"""hybridpar.tknp.cost_model (pure), LPM's long-queue fallback."""
from __future__ import annotations

import math

import pytest
import torch

from hybridpar.roofline import ModelShape
from hybridpar.tknp import cost_model as cm

LLAMA7B = ModelShape("llama-7b", 4096, 11008, 32, 32, 32, 128, 32000)
GQA = ModelShape("gqa", 4096, 14336, 32, 32, 8, 128, 128256)


def costs(overhead: dict[str, float] | None = None) -> cm.ComponentCosts:
    lin = cm.LinearCost(5e-6, 3e12)
    return cm.ComponentCosts(lin, cm.LinearCost(8e-6, 2e12), cm.LinearCost(10e-6, 3e11), cm.LinearCost(12e-6, 2e11),
                             cm.LinearCost(12e-6, 2e11), overhead or {})


def test_fit_linear_recovers_latency_and_bandwidth() -> None:
    sizes = [1e6, 4e6, 16e6, 64e6]
    fit = cm.fit_linear(sizes, [7e-6 + s / 2.5e11 for s in sizes])
    assert fit.latency == pytest.approx(7e-6, rel=1e-6) and fit.bandwidth == pytest.approx(2.5e11, rel=1e-6)
    flat = cm.fit_linear([1, 2, 3], [5e-6, 4e-6, 5e-6])  # no growth: a constant
    assert flat.bandwidth == math.inf and flat(1e9) == pytest.approx(14e-6 / 3)
    with pytest.raises(ValueError):
        cm.fit_linear([1, 1], [1.0, 2.0])


def test_layer_bytes_match_the_roofline_module() -> None:
    from hybridpar.roofline import weight_bytes

    per_layer = cm.layer_weight_bytes(LLAMA7B)
    total = per_layer * 32 + 2 * cm.lm_head_bytes(LLAMA7B)
    assert total == pytest.approx(weight_bytes(LLAMA7B), rel=1e-3)  # norms are the difference
    assert cm.layer_kv_bytes_per_token(LLAMA7B, tp=2) == cm.layer_kv_bytes_per_token(LLAMA7B) / 2
    # tp larger than the KV heads: TP replicates a KV head, so per-rank KV stops shrinking
    assert cm.layer_kv_bytes_per_token(GQA, tp=16) == cm.layer_kv_bytes_per_token(GQA, tp=8)


def test_step_structure_per_strategy() -> None:
    c = costs({"tp": 1e-5, "tknp": 2e-5})
    step = cm.StepShape(batch=8, context=4096)
    tp = cm.step_components("tp", LLAMA7B, step, c)
    dp = cm.step_components("dp", LLAMA7B, step, c)
    tk = cm.step_components("tknp", LLAMA7B, step, c)
    assert tp["all_reduce"] > 0 and tp["scatter"] == tp["gather"] == 0
    assert tk["scatter"] > 0 and tk["gather"] > 0 and tk["all_reduce"] == 0
    assert dp["scatter"] == dp["all_reduce"] == 0 and dp["overhead"] == 0
    # TKNP reads the full weights on its root; TP half of them per GPU
    assert tk["qkv"] + tk["o_mlp"] > tp["qkv"] + tp["o_mlp"]
    # TP and TKNP split the KV bytes two ways, DP as well (half the batch, all heads)
    assert tp["attention"] == pytest.approx(tk["attention"]) == pytest.approx(dp["attention"])
    assert cm.predict_step("tp", LLAMA7B, step, c) == pytest.approx(sum(tp.values()))
    assert cm.predict_throughput("dp", LLAMA7B, step, c) == pytest.approx(8 / sum(dp.values()))
    with pytest.raises(ValueError):
        cm.step_components("pp", LLAMA7B, step, c)
    with pytest.raises(ValueError):
        cm.step_components("tknp", LLAMA7B, cm.StepShape(batch=3, context=16), c)


def test_tp_times_tknp_on_four_gpus() -> None:
    ar2, ar4 = cm.LinearCost(7e-6, 3e11), cm.LinearCost(11e-6, 3e11)
    c = cm.ComponentCosts(*list(vars(costs()).values())[:5], {"tknp-tp2": 3e-5, "tknp": 1e-5}, {2: ar2, 4: ar4})
    mixed = cm.StepShape(batch=8, context=4096, num_gpus=4, tensor_parallel_size=2)
    both = cm.step_components("tknp", LLAMA7B, mixed, c)
    pure = cm.step_components("tknp", LLAMA7B, cm.StepShape(batch=8, context=4096, num_gpus=4), c)
    tp4 = cm.step_components("tp", LLAMA7B, cm.StepShape(batch=8, context=4096, num_gpus=4), c)
    hb = 8 * LLAMA7B.hidden_size * 2
    assert both["all_reduce"] == pytest.approx(32 * 2 * ar2(hb)) and tp4["all_reduce"] == pytest.approx(32 * 2 * ar4(hb))
    assert pure["all_reduce"] == 0 and both["overhead"] == pytest.approx(32 * 3e-5)  # overheads kept apart
    assert cm.config_key("tknp", mixed) == "tknp-tp2" and cm.split_sizes("tknp", mixed) == (2, 2)
    # TP 2 x TKNP 2 reads half the weights of TKNP 4 on each root, and splits the KV 4 ways like it
    assert both["qkv"] + both["o_mlp"] < pure["qkv"] + pure["o_mlp"]
    assert both["attention"] == pytest.approx(pure["attention"]) == pytest.approx(tp4["attention"])
    # each TKNP 2 group scatters half the batch's half-heads; TKNP 4 three quarters of all heads
    assert both["scatter"] < pure["scatter"]
    for bad in (3, 4, 0):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            cm.step_components("tknp", LLAMA7B, cm.StepShape(8, 64, num_gpus=4, tensor_parallel_size=bad), c)


def test_calibration_reproduces_the_measured_point() -> None:
    c = costs()
    step = cm.StepShape(batch=8, context=1024)
    measured = cm.predict_step("tknp", LLAMA7B, step, c) + 32 * 40e-6
    over = cm.calibrate_overhead("tknp", LLAMA7B, step, c, measured)
    assert over == pytest.approx(40e-6)
    calibrated = cm.ComponentCosts(c.gemm, c.attention, c.all_reduce, c.scatter, c.gather, {"tknp": over})
    assert cm.relative_error(cm.predict_step("tknp", LLAMA7B, step, calibrated), measured) == pytest.approx(0, abs=1e-12)


def test_lpm_serves_a_long_queue_first_come_first_served() -> None:
    from hybridpar.radix.mem_pool import ReqToTokenPool, TokenToKVPoolAllocator
    from hybridpar.radix.radix_cache import RadixCache
    from hybridpar.radix.schedule_policy import LPM_MAX_QUEUE, SchedulePolicy
    from hybridpar.core import ServeReq

    cache = RadixCache(ReqToTokenPool(4, 64), TokenToKVPoolAllocator(256, 1), 1)
    cache.insert([7, 7, 7, 7], torch.arange(4))

    def queue(n: int) -> list[ServeReq]:
        reqs = [ServeReq(i, [1, 2, 3] if i % 2 else [7, 7, 7, 7, 9]) for i in range(n)]
        for i, r in enumerate(reqs):
            r.arrival_seq = i
        return reqs

    short = queue(LPM_MAX_QUEUE)
    SchedulePolicy("lpm", cache).calc_priority(short)
    assert [r.rid % 2 for r in short[:3]] == [0, 0, 0]  # matched prefixes first
    long = queue(LPM_MAX_QUEUE + 1)
    SchedulePolicy("lpm", cache).calc_priority(long)
    assert [r.rid for r in long] == list(range(LPM_MAX_QUEUE + 1))  # arrival order, no matching


def test_bench_tknp_configurations_and_fits() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from bench_tknp import Config, configs_for, fit_costs, fits

    four = configs_for(4)
    assert [c.label for c in four] == ["TP4", "DP4", "TKNP4", "TP2xTKNP2"] and [c.label for c in configs_for(2)] == [
        "TP2", "DP2", "TKNP2"]
    assert len({c.key for c in four}) == 4  # one calibrated overhead each
    assert Config("tknp", 4, 2).step(8, 64).tensor_parallel_size == 2 and Config("tp", 4).step(8, 64).tensor_parallel_size == 1
    gib = 1 << 30
    # 32 x 32K tokens of Llama-7B KV is 512 GiB: no 4-GPU layout fits it in 141 GB GPUs; 8 x 1K fits every one
    assert not any(fits(LLAMA7B, 32, 32768, c, 141 * gib) for c in four)
    assert all(fits(LLAMA7B, 8, 1024, c, 141 * gib) for c in four)
    assert not fits(LLAMA7B, 6, 1024, Config("dp", 4), 141 * gib)  # 6 requests do not split over 4 replicas
    micro = {"gemm": [(1e6, 1e-5), (2e6, 2e-5)], "attention": [(1e6, 1e-5), (2e6, 2e-5)],
             "scatter": [(1e3, 1e-5), (2e3, 1.1e-5)], "gather": [(1e3, 1e-5), (2e3, 1.1e-5)],
             "all_reduce_2": [(1e3, 8e-6), (2e3, 9e-6)], "all_reduce_4": [(1e3, 12e-6), (2e3, 14e-6)]}
    costs = fit_costs(micro, 4)
    assert costs.all_reduce is costs.all_reduce_by_size[4] and costs.all_reduce_for(2)(1e3) == pytest.approx(8e-6)
