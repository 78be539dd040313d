"""RadixAttention on 2 gloo ranks, seen from each rank: same plans and slots, different KV heads, equal pools."""
from __future__ import annotations

import pytest

from hybridpar.demos.radix_tp_trace import (
    BASELINE,
    check_serving,
    format_plans,
    format_ranks,
    format_serving,
    plans_agree,
    run_tp_serving,
    slot_ranges,
    trace_verdict,
)
from hybridpar.radix.workload import SharedPrefixWorkload

WORKLOAD = SharedPrefixWorkload(2, 2, 32, 8, 2)
CONFIGS = {"LPM": {}, "FCFS": {"schedule_policy": "fcfs"}, BASELINE: {"disable_radix_cache": True},
           "LPM, 64 tokens": {"max_total_tokens": 64}}


@pytest.fixture(scope="module")
def reports():
    return run_tp_serving(2, WORKLOAD, CONFIGS, backend="gloo", warm_up=False)


def test_ranks_run_the_same_plans_but_store_their_own_kv_heads(reports):
    assert [r.rank for r in reports] == [0, 1]
    assert [(r.kv_heads, r.total_kv_heads) for r in reports] == [(2, 4), (2, 4)]  # qwen2-tiny: 4 KV heads
    for name in CONFIGS:
        assert plans_agree(reports, name), name
        assert reports[0].runs[name].digest == reports[1].runs[name].digest, name
    prefill = [i for i, p in enumerate(reports[0].runs["LPM"].plans) if p.kind == "prefill"]
    assert prefill and all(reports[0].runs["LPM"].plans[i].k_checksum != reports[1].runs["LPM"].plans[i].k_checksum
                           for i in prefill), "the same slots hold different KV heads on different ranks"
    assert "every rank ran the same" in format_plans(reports, "LPM") and ": True" in format_plans(reports, "LPM")
    assert format_ranks(reports).count("identical on all 2 ranks: True") == len(CONFIGS)


def test_hit_rates_and_saved_prefill(reports):
    runs = {name: run.metrics for name, run in reports[0].runs.items()}
    best = WORKLOAD.theoretical_hit_rate(16)
    assert runs["LPM"]["cache_hit_rate"] == pytest.approx(best) == 32 / 80
    assert runs["LPM, 64 tokens"]["cache_hit_rate"] == pytest.approx(best)  # the pool holds the longest request
    assert runs["FCFS"]["cache_hit_rate"] == 0.0 == runs[BASELINE]["cache_hit_rate"]  # all batched at once
    assert runs[BASELINE]["prefill_tokens_computed"] - runs["LPM"]["prefill_tokens_computed"] == 2 * 32
    outputs = [run.outputs for run in reports[0].runs.values()]
    assert all(o == outputs[0] for o in outputs) and all(len(o) == 2 for o in outputs[0])
    table = format_serving(reports, WORKLOAD)
    assert "same generated tokens in every run: True" in table and "0.400" in table
    assert "tok/s" in format_serving(reports, WORKLOAD, timings=True)
    verdict = trace_verdict(reports, WORKLOAD)
    assert verdict.startswith("all 2 ranks ran the same step plans and hold identical pools")
    assert "'LPM' reused 40 % of prompt tokens (best possible 40 %) and computed 64 fewer prefill tokens" in verdict


def test_bad_configuration_is_rejected_before_spawning():
    with pytest.raises(ValueError, match="ServerArgs fields"):
        check_serving(2, WORKLOAD, {"x": {"no_such_knob": 1}}, 16, 8192, None)
    with pytest.raises(ValueError, match="schedule_policy"):
        run_tp_serving(2, WORKLOAD, {"x": {"schedule_policy": "random"}})
    with pytest.raises(ValueError, match="configs is empty"):
        run_tp_serving(2, WORKLOAD, {})


def test_slot_ranges():
    assert slot_ranges([16, 17, 18, 32, 40, 41]) == "16-18, 32, 40-41"
    assert slot_ranges([]) == "-"
