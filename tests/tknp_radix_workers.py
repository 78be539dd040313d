"""Rank function for the paged / radix-cache token-parallel tests (importable by spawned ranks)."""
from __future__ import annotations

from typing import Any

from hybridpar.distributed.parallel_state import destroy_model_parallel, initialize_model_parallel, is_tknp_root
from hybridpar.models.sampling import SamplingParams
from hybridpar.radix.scheduler import TPScheduler
from hybridpar.tknp.runner import TknpSetup, build_paged_worker, build_tknp_scheduler, parameter_objects_alive


def _submit(sched: TPScheduler, prompts: list[list[int]], max_new: list[int], arrivals: list[int]) -> None:
    for ids, n, a in zip(prompts, max_new, arrivals):
        sched.add_request(ids, sampling=SamplingParams(max_new_tokens=n, ignore_eos=True), arrival_step=a)


def serve_radix_layouts(layouts: list[tuple[int, int]], model: str, budget: dict[int, int], max_seq_len: int,
                        prompts: list[list[int]], max_new: list[int], arrivals: list[int], page_size: int
                        ) -> dict[tuple[int, int], Any]:
    """Every rank, per layout: roots serve the workload twice (all at once, then arriving over time) with a
    TknpScheduler, then once with a plain TPScheduler (the TP-only reference); workers attend."""
    results = {}
    for tp, tknp in layouts:
        initialize_model_parallel(tensor_parallel_size=tp, token_parallel_size=tknp)
        setup = TknpSetup(model_name=model, tensor_parallel_size=tp, token_parallel_size=tknp,
                          memory_budget_bytes=budget[tp], max_seq_len=max_seq_len, max_requests_per_rank=4)
        out: dict[str, Any] = {}
        if is_tknp_root():
            sched = build_tknp_scheduler(setup, page_size=page_size, debug_checks=True)
            try:
                for name, when in (("together", [0] * len(prompts)), ("joining", arrivals)):
                    _submit(sched, prompts, max_new, when)
                    res = sched.process_requests()
                    out[name] = {"outputs": [r.output_ids for r in res.values()],
                                 "cached": [r.cached_tokens for r in res.values()],
                                 "placement": [sched.placement.get(rid) for rid in res],
                                 "preemptions": sum(r.num_preemptions for r in res.values())}
                out["digests"] = sched.rank_digests() if sched.is_leader else None
                out["capacities"] = sched.capacities
                out["pool_tokens"] = sched.allocator.size
            finally:
                sched.shutdown()
            plain = TPScheduler(sched.wrapper, max_total_tokens=4096, max_running_requests=16)
            _submit(plain, prompts, max_new, arrivals)
            out["reference"] = [r.output_ids for r in plain.process_requests().values()]
            out["parameter_objects"] = parameter_objects_alive()
            del sched, plain
        else:
            worker = build_paged_worker(setup, page_size=page_size)
            out["stats"] = worker.serve().to_dict()
            out["digest"] = worker.pool_digest()
            out["capacity"] = worker.capacity
            out["parameter_objects"] = parameter_objects_alive()
        results[(tp, tknp)] = out
        destroy_model_parallel()
    return results
