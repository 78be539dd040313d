"""Rank function for the paged / radix-cache token-parallel tests (importable by spawned ranks)."""
from __future__ import annotations

from typing import Any

from hybridpar.distributed.parallel_state import destroy_model_parallel, initialize_model_parallel
from hybridpar.tknp.runner import TknpSetup
from hybridpar.tknp.verify import PagedWorkload, verify_paged_rank


def serve_radix_layouts(layouts: list[tuple[int, int]], model: str, budget: dict[int, int], max_seq_len: int,
                        workload: PagedWorkload, page_size: int) -> dict[tuple[int, int], Any]:
    """Every rank, per ``(tp, tknp)`` layout in turn: groups, :func:`verify_paged_rank`, teardown."""
    results = {}
    for tp, tknp in layouts:
        initialize_model_parallel(tensor_parallel_size=tp, token_parallel_size=tknp)
        setup = TknpSetup(model_name=model, tensor_parallel_size=tp, token_parallel_size=tknp,
                          memory_budget_bytes=budget[tp], max_seq_len=max_seq_len, max_requests_per_rank=4)
        results[(tp, tknp)] = verify_paged_rank(setup, workload, page_size)
        destroy_model_parallel()
    return results
