"""All-reduce: raw ``torch.distributed.all_reduce`` versus hybridpar's, and small-message latency with CUDA graphs.

For every size (bf16 on GPUs, 8 KiB .. 1 GiB by powers of two) each rank times, with CUDA events,
the median of ``--iters`` single calls of:

* ``raw``: ``dist.all_reduce(x)`` in place (what nccl-tests' all_reduce_perf measures);
* ``layer``: :func:`hybridpar.distributed.communication_op.all_reduce_`, the in-place call a
  ``RowParallelLinear`` makes at inference (its partial sum is a fresh temporary);
* ``copy``: :func:`hybridpar.distributed.communication_op.all_reduce`, which returns a new tensor
  (one extra read + write of the message before the collective).

Bus bandwidth is ``size / time * 2 (n-1) / n`` (nccl-tests' convention). Then, for messages up to
1 MiB, the latency per call of ``--chain`` back-to-back in-place all-reduces launched eagerly
versus replayed from one CUDA graph (launch overhead removed).

    python bench/bench_allreduce.py                 # 2 GPUs, NCCL
    python bench/bench_allreduce.py --cpu           # gloo, float32, small sizes (the CPU miniature)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch
import torch.distributed as dist

from hybridpar import launch
from hybridpar.bench import bench_env, format_table, median, time_fn, write_results
from hybridpar.distributed.bandwidth import bus_factor, format_size
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel


def _slowest(seconds: float, device: torch.device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def worker(sizes: list[int], dtype_name: str, iters: int, chain: int, graph_max: int) -> dict:
    from hybridpar.distributed.communication_op import all_reduce, all_reduce_

    initialize_tensor_parallel(dist.get_world_size())
    group = get_tp_group()
    device = current_device()
    dtype = getattr(torch, dtype_name)
    n = dist.get_world_size()
    rows = []
    for size in sizes:
        # small random values: repeated in-place sums double them, and must not overflow bf16
        x = torch.randn(size // dtype.itemsize, dtype=torch.float32, device=device).mul_(1e-6).to(dtype)
        variants = {
            "raw": lambda: dist.all_reduce(x),
            "layer": lambda: all_reduce_(x, group),
            "copy": lambda: all_reduce(x, group),
        }
        row = {"size_bytes": size}
        for name, fn in variants.items():
            x.copy_(torch.randn_like(x, dtype=torch.float32).mul_(1e-6))
            dist.barrier()
            t = _slowest(median(time_fn(fn, device, iters=iters, warmup=3)), device)
            row[f"{name}_s"] = t
            row[f"{name}_busbw"] = size / t * bus_factor("all_reduce", n)
        row["layer_vs_raw"] = row["layer_busbw"] / row["raw_busbw"]
        row["copy_vs_raw"] = row["copy_busbw"] / row["raw_busbw"]
        rows.append(row)
        del x
    latency = []
    if device.type == "cuda":
        for size in [s for s in sizes if s <= graph_max]:
            x = torch.randn(size // dtype.itemsize, dtype=torch.float32, device=device).mul_(1e-6).to(dtype)

            def eager_chain() -> None:
                for _ in range(chain):
                    all_reduce_(x, group)

            eager = _slowest(median(time_fn(eager_chain, device, iters=iters, warmup=3)), device) / chain
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                eager_chain()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                eager_chain()
            replay = _slowest(median(time_fn(graph.replay, device, iters=iters, warmup=3)), device) / chain
            latency.append({"size_bytes": size, "eager_us": eager * 1e6, "graph_us": replay * 1e6})
            del graph, x
    return {"world_size": n, "backend": dist.get_backend(), "dtype": dtype_name, "sweep": rows, "latency": latency}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU, float32, 8 KiB .. 1 MiB (miniature)")
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--min-bytes", type=int, default=8 << 10)
    p.add_argument("--max-bytes", type=int, default=1 << 30)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--chain", type=int, default=20, help="all-reduces per eager chain / graph")
    args = p.parse_args(argv)
    if args.cpu:
        backend, dtype, max_bytes, iters = "gloo", "float32", min(args.max_bytes, 1 << 20), min(args.iters, 5)
    else:
        if torch.cuda.device_count() < args.nprocs:
            p.error(f"needs {args.nprocs} GPUs (found {torch.cuda.device_count()}); use --cpu for the gloo miniature")
        backend, dtype, max_bytes, iters = "nccl", "bfloat16", args.max_bytes, args.iters
    sizes, s = [], args.min_bytes
    while s <= max_bytes:
        sizes.append(s)
        s *= 2
    res = launch(worker, args.nprocs, sizes, dtype, iters, args.chain, 1 << 20, backend=backend, timeout=600)[0]
    for r in res["sweep"]:
        r["size"] = format_size(r["size_bytes"])
        for k in ("raw", "layer", "copy"):
            r[f"{k}_us"] = r[f"{k}_s"] * 1e6
            r[f"{k}_gbs"] = r[f"{k}_busbw"] / 1e9
    print(f"all-reduce, {res['world_size']} ranks, {res['backend']}, {res['dtype']}: bus bandwidth (GB/s)")
    print(format_table(res["sweep"], [("size", "size", ""), ("raw_us", "raw us", ".1f"), ("raw_gbs", "raw", ".1f"),
                                      ("layer_us", "layer us", ".1f"), ("layer_gbs", "layer", ".1f"),
                                      ("layer_vs_raw", "layer/raw", ".3f"), ("copy_gbs", "copy", ".1f"),
                                      ("copy_vs_raw", "copy/raw", ".3f")]))
    if res["latency"]:
        for r in res["latency"]:
            r["size"] = format_size(r["size_bytes"])
        print("\nsmall-message latency per all-reduce (us): eager launches vs one CUDA graph")
        print(format_table(res["latency"], [("size", "size", ""), ("eager_us", "eager", ".1f"),
                                            ("graph_us", "graph", ".1f")]))
    path = write_results("allreduce", res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
