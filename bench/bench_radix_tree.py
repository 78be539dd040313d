"""The radix tree's own cost: its operations alone, on the CPU, over SGLang's shared-prefix workload.

No model runs: each request goes through the calls a scheduler makes around its forward passes
(match at admission, lock, allocate and write the new slots, a chunk cached when prefill ends,
one slot per decoded token, then caching the finished request), and eviction makes room when the
KV pool runs short. Only the tree's calls are timed (:class:`bench_radix.TreeTimer`, outermost
calls), so the result is microseconds of tree work per request and per call, the numerator of
``bench_radix.py``'s tree share without the GPU's denominator.

    python bench/bench_radix_tree.py                     # 32 x 16 x 2048 / 128 / 128, page size 1
    python bench/bench_radix_tree.py --page-size 16 --evict-rule split-lower-old
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from bench_radix import TreeTimer
from hybridpar.bench import bench_env, format_table, median, write_results
from hybridpar.core import Req
from hybridpar.radix.mem_pool import ReqToTokenPool, TokenToKVPoolAllocator
from hybridpar.radix.radix_cache import RadixCache
from hybridpar.radix.workload import SharedPrefixWorkload


def _alloc(cache: RadixCache, n: int) -> torch.Tensor:
    slots = cache.token_to_kv_pool_allocator.alloc(n)
    if slots is None:
        cache.evict(n)
        slots = cache.token_to_kv_pool_allocator.alloc(n)
    return slots


def run(workload: SharedPrefixWorkload, page_size: int, pool_tokens: int, running: int, **cache_kwargs) -> dict:
    allocator = TokenToKVPoolAllocator(pool_tokens, page_size)
    rows = ReqToTokenPool(running, workload.system_len + workload.question_len + workload.output_len + page_size)
    cache = RadixCache(rows, allocator, **cache_kwargs)
    reqs = [Req(i, r.prompt_ids) for i, r in enumerate(workload.requests())]
    t0 = time.perf_counter()
    with TreeTimer() as timer:
        for start in range(0, len(reqs), running):
            batch = reqs[start:start + running]
            for req in batch:  # admission and prefill
                match = cache.match_prefix_for_req(req)
                cache.inc_lock_ref(match.last_node)
                req.cache_protected_len = match.prefix_len
                req.req_pool_idx = rows.alloc(1)[0]
                rows.write(req.req_pool_idx, 0, match.device_indices)
                new = len(req.origin_input_ids) - match.prefix_len
                rows.write(req.req_pool_idx, match.prefix_len, _alloc(cache, new)[:new])
                req.kv_len = len(req.origin_input_ids)
                cache.cache_unfinished_req(req)
            for _ in range(workload.output_len):  # decode: one token and one slot per request per step
                for req in batch:
                    req.output_ids.append(7)
                    if req.kv_len % page_size:  # the open page's next slot
                        slots = rows.read(req.req_pool_idx, req.kv_len)[-1:] + 1
                    else:
                        slots = _alloc(cache, 1)[:1]
                    rows.write(req.req_pool_idx, req.kv_len, slots)
                    req.kv_len += 1
            for req in batch:
                cache.cache_finished_req(req)
    wall = time.perf_counter() - t0
    cache.check_integrity([])
    return {"requests": len(reqs), "tree_s": timer.seconds, "tree_calls": timer.calls, "wall_s": wall,
            "us_per_request": timer.seconds / len(reqs) * 1e6, "us_per_call": timer.seconds / timer.calls * 1e6}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=32)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--system", type=int, default=2048)
    p.add_argument("--question", type=int, default=128)
    p.add_argument("--outputs", type=int, default=128)
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--running", type=int, default=32)
    p.add_argument("--pool", type=int, default=200_000, help="KV pool size in tokens (small enough to evict)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    wl = SharedPrefixWorkload(args.groups, args.prompts, args.system, args.question, args.outputs, vocab_size=30000)
    runs = [run(wl, args.page_size, args.pool, args.running) for _ in range(args.repeats)]
    best = sorted(runs, key=lambda r: r["tree_s"])
    row = dict(best[len(best) // 2], us_per_request_all=[r["us_per_request"] for r in runs],
               page_size=args.page_size, tree_ms_median=median(r["tree_s"] for r in runs) * 1e3)
    print(f"shared-prefix workload {args.groups} x {args.prompts} x {args.system} / {args.question} / {args.outputs}, "
          f"page size {args.page_size}, median of {args.repeats}")
    print(format_table([row], [("requests", "requests", "d"), ("tree_calls", "tree calls", "d"),
                               ("tree_ms_median", "tree ms", ".1f"), ("us_per_request", "us/request", ".1f"),
                               ("us_per_call", "us/call", ".1f")]))
    path = write_results("radix_tree" + args.tag, {"args": vars(args), "rows": [row]}, bench_env("cpu"))
    print(f"wrote {path}")
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
