"""RadixAttention: prefix-cache hit rate, prefill work, TTFT and throughput on shared-prefix workloads.

SGLang's generated-shared-prefix benchmark: ``G`` groups x ``P`` prompts, each a group's system
prompt of ``S`` tokens plus its own ``Q``-token question, ``O`` output tokens each
(:class:`~hybridpar.radix.workload.SharedPrefixWorkload`). All requests arrive at once and are
served by :class:`~hybridpar.radix.scheduler.TPScheduler` (continuous batching, CUDA graphs on a
GPU) in these configurations:

==========  ==========  =================  ======================================
cache       policy      arrival            what it shows
==========  ==========  =================  ======================================
off         fcfs        ordered            the baseline: every prompt computed
on          fcfs/lpm    ordered/shuffled   reuse, and whether the order matters
==========  ==========  =================  ======================================

plus a *no-sharing* workload (``S = 0``, questions of ``S + Q`` tokens), cache on and off, where
the tree can only cost time. Reported per run: hit rate (cached prompt tokens / prompt tokens)
against the best any schedule can reach, prefill tokens computed, TTFT p50/p90, total tokens/s,
and the wall time spent inside radix-tree operations (``match_prefix``, ``prefix_len``,
``insert``, ``evict``, lock changes, ``cache_*_req``; outermost calls timed, per operation too)
as a share of the run.

Fairness: every configuration first runs once, untimed, at the measured shape (kernels, graph
buckets, allocator), then ``--runs`` timed runs each (3), the configurations taking turns; each
row is the median run by wall time, with the fastest and slowest wall time beside it.

**The ideal speedup.** Every step of every run is timed by kind (``perf_counter`` around
``TPScheduler.step``, whose leader ends in a host read of the sampled tokens, so a step's time is
its GPU time too). Assume that a prefill step's time is proportional to the prompt tokens it
computes and that the decode steps do not change with the cache. Then a cache that skips the
fraction ``saved = cached prompt tokens / prompt tokens`` (of the cache-on run) saves at best
``saved * prefill_s_off`` of the cache-off run's ``wall_off``, and::

    ideal_speedup  = wall_off / (wall_off - saved * prefill_s_off)
    speedup        = wall_off / wall_on                     (= the ratio of tokens/s)
    share_of_ideal = (speedup - 1) / (ideal_speedup - 1)    (the part of the ideal gain reached)

    python bench/bench_radix.py                          # GPU: qwen2.5-0.5b-shape, 64 x 16 x 2048 / 128 / 256
    python bench/bench_radix.py --quick                  # GPU, about a minute: 32 x 16 x 2048 / 128 / 128, off vs lpm
    python bench/bench_radix.py --groups 16 --outputs 64   # a quarter of the requests and outputs
    python bench/bench_radix.py --cpu                    # miniature: qwen2-tiny, 2 x 4 x 32 / 8 / 4
"""
from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from hybridpar import launch
from hybridpar.bench import ModelHandle, bench_env, build_model, format_table, percentile, write_results
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel
from hybridpar.radix.radix_cache import RadixCache
from hybridpar.radix.workload import SharedPrefixWorkload

TREE_OPS = ("match_prefix", "match_prefix_for_req", "prefix_len", "insert", "evict", "inc_lock_ref", "dec_lock_ref",
            "cache_finished_req", "cache_unfinished_req")


def ideal_speedup(wall_off: float, prefill_s_off: float, saved_fraction: float) -> float:
    """The cache-off run's wall time over the same run without ``saved_fraction`` of its prefill time."""
    return wall_off / (wall_off - prefill_s_off * saved_fraction)


def share_of_ideal(speedup: float, ideal: float) -> float:
    """``(speedup - 1) / (ideal - 1)``: 1 when the cache saves all the prefill time it could, 0 when none."""
    return (speedup - 1) / (ideal - 1) if ideal > 1 else float("nan")


class StepTimer:
    """Wraps one scheduler's ``step`` to add each step's wall time to ``seconds[kind]`` (prefill, decode)."""

    def __init__(self, sched: Any) -> None:
        self.seconds: dict[str, float] = {"prefill": 0.0, "decode": 0.0}
        step, log = sched.step, sched.step_log

        def timed(results: dict) -> bool:
            n, start = len(log), time.perf_counter()
            ran = step(results)
            if len(log) > n:
                kind = log[-1].kind
                self.seconds[kind] = self.seconds.get(kind, 0.0) + time.perf_counter() - start
            return ran

        sched.step = timed


class TreeTimer:
    """Patches :class:`RadixCache`'s operations to add their wall time to ``seconds`` (outermost calls only).

    ``by_op[name] = [calls, seconds]`` splits the total by the operation called from outside the tree."""

    def __init__(self) -> None:
        self.seconds, self.calls, self._depth, self._saved = 0.0, 0, 0, {}
        self.by_op: dict[str, list] = {}

    def __enter__(self) -> TreeTimer:
        for name in TREE_OPS:
            original = getattr(RadixCache, name)
            self._saved[name] = original
            setattr(RadixCache, name, self._wrap(original))
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._saved.items():
            setattr(RadixCache, name, original)

    def _wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self._depth += 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    dt = time.perf_counter() - start
                    self.seconds += dt
                    self.calls += 1
                    op = self.by_op.setdefault(fn.__name__, [0, 0.0])
                    op[0] += 1
                    op[1] += dt
        return timed


def serve(handle: ModelHandle, workload: SharedPrefixWorkload, shuffle: bool, **overrides) -> dict:
    from hybridpar.core import SamplingParams
    from hybridpar.radix.scheduler import TPScheduler

    sched = TPScheduler(handle, **overrides)
    for req in workload.requests(shuffle=shuffle):
        sched.add_request(req.prompt_ids, sampling=SamplingParams(max_new_tokens=req.max_new_tokens, ignore_eos=True))
    steps = StepTimer(sched)
    with TreeTimer() as timer:
        results = sched.process_requests()
    m = sched.metrics
    capture = sched.runner.graph_runner.capture_seconds if sched.runner.graph_runner is not None else 0.0
    wall = m.wall_s - capture
    ttft = sorted(r.ttft_s for r in results.values())
    page = sched.args.page_size
    return {
        "hit_rate": m.cache_hit_rate, "max_hit_rate": workload.theoretical_hit_rate(page),
        "prompt_tokens": m.prompt_tokens, "cached_prompt_tokens": m.cached_prompt_tokens,
        "prefill_tokens_computed": m.prefill_tokens_computed, "generated_tokens": m.generated_tokens,
        "prefill_steps": m.prefill_steps, "decode_steps": m.decode_steps, "preemptions": m.preemptions,
        "wall_s": wall, "graph_capture_s": capture,
        "ttft_p50_s": percentile(ttft, 50), "ttft_p90_s": percentile(ttft, 90),
        "total_tok_s": (m.prompt_tokens + m.generated_tokens) / wall,
        "output_tok_s": m.generated_tokens / wall,
        "tree_s": timer.seconds, "tree_calls": timer.calls, "tree_share": timer.seconds / m.wall_s,
        "tree_ops": timer.by_op, "prefill_s": steps.seconds["prefill"], "decode_s": steps.seconds["decode"],
    }


def worker(model_name: str, dtype_name: str, shape: dict, graphs: bool, server: dict, quick: bool,
           timed_runs: int = 3) -> list[dict]:
    initialize_tensor_parallel(1)
    device = current_device()
    model = build_model(model_name, device, getattr(torch, dtype_name), get_tp_group())
    handle = ModelHandle(model, get_tp_group(), device, server_kwargs=dict(use_cuda_graph=graphs, **server))
    vocab = min(model.config.vocab_size, 32000)
    shared = SharedPrefixWorkload(shape["G"], shape["P"], shape["S"], shape["Q"], shape["O"], vocab_size=vocab)
    alone = SharedPrefixWorkload(shape["G"], shape["P"], 0, shape["S"] + shape["Q"], shape["O"], vocab_size=vocab, seed=1)
    runs = [
        ("shared", shared, False, True, "fcfs"),
        ("shared", shared, False, False, "fcfs"),
        ("shared", shared, False, False, "lpm"),
        ("shared", shared, True, False, "fcfs"),
        ("shared", shared, True, False, "lpm"),
        ("no-sharing", alone, True, True, "fcfs"),
        ("no-sharing", alone, True, False, "lpm"),
    ]
    if quick:  # the comparison the targets name: cache off vs on with LPM
        runs = [runs[0], runs[2]]

    def once(workload, shuffle, disable, policy) -> dict:
        return serve(handle, workload, shuffle, disable_radix_cache=disable, schedule_policy=policy)

    for _, *config in runs:  # warm-up: every configuration once at the measured shape (kernels, graph buckets)
        once(*config)
    samples: list[list[dict]] = [[] for _ in runs]
    for _ in range(timed_runs):  # the configurations take turns, so a drift of the machine hits all alike
        for i, (_, *config) in enumerate(runs):
            samples[i].append(once(*config))
    rows = []
    for (label, workload, shuffle, disable, policy), done in zip(runs, samples):
        done.sort(key=lambda r: r["wall_s"])
        row = {"workload": label, "arrival": "shuffled" if shuffle else "ordered",
               "cache": "off" if disable else "on", "policy": policy}
        row.update(done[len(done) // 2])  # the median run (odd --runs), with its own hit rate, TTFT and tree time
        row.update(runs=len(done), wall_s_min=done[0]["wall_s"], wall_s_max=done[-1]["wall_s"])
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="miniature: qwen2-tiny, fp32, 2 x 4 x 32 / 8 / 4")
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true",
                   help="only shared-prefix cache off vs on (lpm); 32 groups and 128 outputs unless given")
    p.add_argument("--groups", type=int, default=None, help="default 64 (32 with --quick)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--system", type=int, default=2048)
    p.add_argument("--question", type=int, default=128)
    p.add_argument("--outputs", type=int, default=None, help="default 256 (128 with --quick)")
    p.add_argument("--max-running", type=int, default=128)
    p.add_argument("--runs", type=int, default=3,
                   help="timed runs per configuration, in turns, after one warm-up run each (the median run is reported)")
    args = p.parse_args(argv)
    args.groups = args.groups or (32 if args.quick else 64)
    args.outputs = args.outputs or (128 if args.quick else 256)
    if args.cpu:
        model, dtype, backend, graphs = args.model or "qwen2-tiny", "float32", "gloo", False
        shape = dict(G=2, P=4, S=32, Q=8, O=4)
        server = dict(max_running_requests=8, max_total_tokens=2048)
    else:
        if not torch.cuda.is_available():
            p.error("no GPU: use --cpu for the miniature")
        model, dtype, backend, graphs = args.model or "qwen2.5-0.5b-shape", "bfloat16", "nccl", True
        shape = dict(G=args.groups, P=args.prompts, S=args.system, Q=args.question, O=args.outputs)
        context = args.system + args.question + args.outputs + 16
        server = dict(max_running_requests=args.max_running, max_context_len=context,
                      max_total_tokens=args.max_running * context + args.groups * args.system + 4096)
    rows = launch(worker, 1, model, dtype, shape, graphs, server, args.quick, args.runs, backend=backend,
                  timeout=3600)[0]
    base = next(r for r in rows if r["workload"] == "shared" and r["cache"] == "off")
    for r in rows:
        ref = next(b for b in rows if b["workload"] == r["workload"] and b["cache"] == "off")
        r["speedup"] = ref["wall_s"] / r["wall_s"]
        r["ideal_speedup"] = ideal_speedup(ref["wall_s"], ref["prefill_s"], r["cached_prompt_tokens"] / r["prompt_tokens"])
        r["share_of_ideal"] = share_of_ideal(r["speedup"], r["ideal_speedup"])
        r["ttft_p50_ms"], r["ttft_p90_ms"] = r["ttft_p50_s"] * 1e3, r["ttft_p90_s"] * 1e3
        r["tree_pct"] = 100 * r["tree_share"]
    print(f"{model}: G={shape['G']} P={shape['P']} S={shape['S']} Q={shape['Q']} O={shape['O']} ({dtype})")
    print(format_table(rows, [("workload", "workload", ""), ("cache", "cache", ""), ("policy", "policy", ""),
                              ("arrival", "arrival", ""), ("hit_rate", "hit", ".3f"), ("max_hit_rate", "max", ".3f"),
                              ("prefill_tokens_computed", "prefill tok", "d"), ("ttft_p50_ms", "TTFT p50 ms", ".0f"),
                              ("ttft_p90_ms", "p90 ms", ".0f"), ("total_tok_s", "tok/s", ".0f"),
                              ("wall_s", "wall s", ".2f"), ("wall_s_min", "min", ".2f"), ("wall_s_max", "max", ".2f"),
                              ("prefill_s", "prefill s", ".2f"), ("decode_s", "decode s", ".2f"),
                              ("speedup", "x off", ".2f"), ("ideal_speedup", "ideal x", ".2f"),
                              ("share_of_ideal", "of ideal", ".2f"), ("tree_pct", "tree %", ".3f")]))
    for r in rows:
        ops = ", ".join(f"{name} {calls} x {s / calls * 1e6:.0f} us" for name, (calls, s) in sorted(r["tree_ops"].items()))
        print(f"tree ops, {r['workload']} cache {r['cache']} {r['policy']} {r['arrival']}: {ops}")
    res = {"model": model, "dtype": dtype, "shape": shape, "server": server, "quick": args.quick, "rows": rows,
           "baseline_total_tok_s": base["total_tok_s"]}
    path = write_results("radix", res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
