"""Where one decode step's time goes on the GPU: its kernels, by kind, next to the replayed step's wall time.

For each model shape and batch, a :class:`~hybridpar.models.cuda_graph.ContiguousDecodeRunner`
with the GPU defaults (Triton decode attention, fused element-wise kernels) runs the decode
loop of ``bench_decode.py``'s ``fused`` mode. Two measurements of the same step:

* ``graph_ms``: the replayed step as ``bench_decode`` times it (CUDA events, host included);
* the step's kernels, from ``torch.profiler`` over ``--steps`` eager runs of the same static step
  (the same kernels the graph records; a graph replay hides them from the profiler): how many per
  step and their summed time, grouped by kind (GEMM/GEMV, attention, norm, RoPE, SwiGLU,
  KV write and index work, other).

``busy_ms`` (the kernels' own time) against ``graph_ms`` says how much of the step is kernel work
and how much is the gaps between kernels; ``roofline_ms`` is ``bench_decode``'s.

    python bench/profile_decode.py                                   # 0.5B and 7B shapes, batch 1
    python bench/profile_decode.py --models qwen2.5-0.5b-shape --batches 1 32
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from hybridpar import launch
from hybridpar.bench import bench_env, build_model, copy_bandwidth, format_table, median, time_fn, write_results
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel

KINDS = (  # first match wins
    ("attention", r"decode_split_kv|merge_splits|attention|fmha|flash"),
    ("norm", r"rms_norm"),
    ("rope", r"rotary"),
    ("swiglu", r"silu"),
    ("gemm", r"gemm|gemv|cutlass|nvjet|sm90_|splitk|splitK|cublas|xmma|ampere"),
    ("kv write / index", r"store_kv|index|scatter|gather|copy|where|arange|fill"),
)


def kind_of(kernel: str) -> str:
    return next((k for k, pattern in KINDS if re.search(pattern, kernel)), "other")


def kernel_profile(step, steps: int) -> tuple[dict[str, dict[str, float]], list[dict]]:
    """Per kind: kernels and milliseconds per step; and the ten most expensive kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: {"kernels": 0.0, "ms": 0.0})
    top = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if e.count == 0 or us == 0 or e.key.startswith(("cudaLaunch", "cudaMemcpy", "Memcpy", "Memset")):
            continue
        k = by_kind[kind_of(e.key)]
        k["kernels"] += e.count / steps
        k["ms"] += us / 1e3 / steps
        top.append({"kernel": e.key[:90], "kind": kind_of(e.key), "per_step": e.count / steps,
                    "ms_per_step": us / 1e3 / steps})
    top.sort(key=lambda r: -r["ms_per_step"])
    return dict(by_kind), top[:10]


def worker(models: list[str], batches: list[int], context: int, steps: int) -> dict:
    from bench_decode import decode_step_fns, read_bytes, kv_bytes_per_token, WINDOW

    initialize_tensor_parallel(1)
    device = current_device()
    bandwidth = copy_bandwidth(device, 4 << 30)
    rows = []
    for name in models:
        model = build_model(name, device, torch.bfloat16, get_tp_group())
        for batch in batches:
            fns, keep = decode_step_fns(model, batch, context, ["fused"])
            with torch.no_grad():
                graph_s = median(time_fn(fns["fused"], device, iters=30, warmup=3))
                eager = _eager_fused(model, batch, context)
                for _ in range(3):
                    eager()
                by_kind, top = kernel_profile(eager, steps)
            roof = (read_bytes(model) + batch * (context - (WINDOW - 1) / 2) * kv_bytes_per_token(model)) / bandwidth
            busy = sum(k["ms"] for k in by_kind.values())
            rows.append({"model": name, "batch": batch, "context": context, "graph_ms": graph_s * 1e3,
                         "busy_ms": busy, "kernels_per_step": sum(k["kernels"] for k in by_kind.values()),
                         "roofline_ms": roof * 1e3, "by_kind": by_kind, "top_kernels": top})
            del fns, keep
        del model
        torch.cuda.empty_cache()
    return {"copy_bandwidth": bandwidth, "rows": rows}


def _eager_fused(model, batch: int, context: int):
    """The fused step run eagerly (the same kernels as the graph, each visible to the profiler)."""
    from hybridpar.models.cuda_graph import ContiguousDecodeRunner

    runner = ContiguousDecodeRunner(model, batch, context, use_cuda_graph=False, attention_backend="triton")
    rows = runner.cache.alloc(batch)
    ids = [1] * batch

    def step() -> None:
        runner.decode(rows, [context] * batch, ids)

    return step


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="*", default=["qwen2.5-0.5b-shape", "llama-7b-shape"])
    p.add_argument("--batches", type=int, nargs="*", default=[1])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a GPU (the profile is of GPU kernels)")
    res = launch(worker, 1, args.models, args.batches, args.context, args.steps, backend="nccl", timeout=900)[0]
    for r in res["rows"]:
        print(f"\n{r['model']} batch {r['batch']}: graph step {r['graph_ms']:.3f} ms, kernels {r['busy_ms']:.3f} ms "
              f"({r['kernels_per_step']:.0f} per step), roofline {r['roofline_ms']:.3f} ms")
        kinds = [{"kind": k, **v} for k, v in sorted(r["by_kind"].items(), key=lambda kv: -kv[1]["ms"])]
        print(format_table(kinds, [("kind", "kind", ""), ("kernels", "per step", ".0f"), ("ms", "ms", ".3f")]))
        print(format_table(r["top_kernels"], [("kernel", "kernel", ""), ("per_step", "n", ".0f"),
                                              ("ms_per_step", "ms", ".3f")]))
    path = write_results("decode_profile", res, bench_env())
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
