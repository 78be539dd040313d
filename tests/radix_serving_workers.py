"""Importable rank functions for tests/test_radix_serving.py: many serving scenarios in one launch."""
from __future__ import annotations

from dataclasses import asdict
from typing import Any
from unittest import mock

import torch
import torch.distributed as dist

from hybridpar.distributed.parallel_state import initialize_tensor_parallel
from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper
from hybridpar.core import SamplingParams
from hybridpar.radix import schedule_policy
from hybridpar.core import RequestTooLargeError
from hybridpar.radix.scheduler import TPScheduler
from hybridpar.radix.workload import SharedPrefixWorkload


def _submit(sched: TPScheduler, prompts: list[list[int]], params: list[SamplingParams],
            arrivals: list[int] | None = None) -> list[int]:
    arrivals = arrivals or [0] * len(prompts)
    return [sched.add_request(p, sampling=s, arrival_step=a) for p, s, a in zip(prompts, params, arrivals)]


def serving_scenarios(prompts: list[list[int]], params: list[SamplingParams],
                      workload: SharedPrefixWorkload | None = None) -> dict[str, Any]:
    """Serve the same requests under many configurations; return outputs, metrics and pool digests.

    Every scheduler runs with ``debug_checks`` (cache integrity after each step on rank 0, every KV
    read verified on every rank). ``out["generate"]``: the same requests through the contiguous-cache
    ``generate``. With ``workload``, also measure its hit rate under LPM.
    """
    torch.set_num_threads(1)
    initialize_tensor_parallel(dist.get_world_size())
    # in-batch deprioritisation from 2 shared pages on, so these short prompts hit each other
    wrapper = TPRadixAttentionModelWrapper(None, page_size=4, max_total_tokens=2048, debug_checks=True,
                                           in_batch_deprioritize_threshold=8)
    out: dict[str, Any] = {"outputs": {}, "metrics": {}, "digests": {}, "notes": {},
                           "generate": [o.token_ids for o in wrapper.generate_ids(prompts, params)]}

    def record(name: str, sched: TPScheduler, outputs: list[list[int]]) -> None:
        out["outputs"][name] = outputs
        out["metrics"][name] = asdict(sched.metrics)
        out["digests"][name] = sched.pool_digest()
        out["kv_heads_per_rank"] = sched.kv_pool.head_num

    def run(name: str, arrivals: list[int] | None = None, **overrides: Any) -> TPScheduler:
        sched = TPScheduler(wrapper, **overrides)
        rids = _submit(sched, prompts, params, arrivals)
        results = sched.process_requests()
        record(name, sched, [results[r].output_ids for r in rids])
        return sched

    run("radix")
    run("radix_page16", page_size=16)
    run("no_cache", disable_radix_cache=True)
    run("fcfs", schedule_policy="fcfs")
    run("chunked", chunked_prefill_size=8, max_prefill_tokens=16)
    sched = run("one_by_one", arrivals=[3 * i for i in range(len(prompts))])
    if sched.is_leader:  # continuous batching: some prefill ran while other requests were decoding
        out["notes"]["prefill_joined_running_batch"] = any(s.kind == "prefill" and s.running for s in sched.step_log)
    # pool of 64 tokens, no decode reservation: the scheduler must evict, make requests wait and preempt
    sched = run("pressure", max_total_tokens=64, init_new_token_ratio=0.0, min_new_token_ratio=0.0)
    if sched.is_leader:
        out["notes"]["waited_while_decoding"] = any(s.kind == "decode" and s.waiting for s in sched.step_log)

    sched = TPScheduler(wrapper)  # requests one at a time, each served to completion; the cache persists
    outputs = []
    for p, s in zip(prompts, params):
        (rid,) = _submit(sched, [p], [s])
        outputs.append(sched.process_requests()[rid].output_ids)
    record("sequential", sched, outputs)

    sched = TPScheduler(wrapper, max_total_tokens=64)  # a request that can never fit is rejected
    try:
        sched.add_request(list(range(80)), max_new_tokens=4)
        out["notes"]["rejected"] = None
    except RequestTooLargeError as exc:
        out["notes"]["rejected"] = str(exc)
    rids = _submit(sched, prompts, params)
    results = sched.process_requests()
    record("after_rejection", sched, [results[r].output_ids for r in rids])

    if workload is not None:
        out["hit_rate"] = {}
        for name, shuffle, overrides in [("ordered", False, {}), ("shuffled", True, {}),
                                         ("ordered_fcfs", False, {"schedule_policy": "fcfs"}),
                                         ("ordered_long_queue", False, {}),
                                         ("ordered_chunked", False, {"chunked_prefill_size": 16}),
                                         ("shuffled_no_in_batch", True, {"in_batch_prefix_caching": False})]:
            sched = TPScheduler(wrapper, page_size=16, **overrides)
            reqs = workload.requests(shuffle=shuffle)
            rids = [sched.add_request(r.prompt_ids, max_new_tokens=r.max_new_tokens) for r in reqs]
            # "long queue": LPM as it runs past LPM_MAX_QUEUE waiting requests (arrival order, no matching)
            with mock.patch.object(schedule_policy, "LPM_MAX_QUEUE", 0 if name == "ordered_long_queue" else 128):
                results = sched.process_requests()
            out["hit_rate"][name] = sched.metrics.cache_hit_rate
            if name == "shuffled":
                greedy = SamplingParams(max_new_tokens=workload.output_len)
                reference = wrapper.generate_ids([r.prompt_ids for r in reqs], greedy)
                out["notes"]["workload_matches_generate"] = all(
                    results[rid].output_ids == ref.token_ids for rid, ref in zip(rids, reference))
    return out
