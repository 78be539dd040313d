"""TP 1 versus TP 2: decode-step time of one model, and where each step's GPU time goes.

The same random bf16 weights (drawn identically on every rank, each rank keeping its shard) run
a decode step of ``B`` requests at ``--context`` tokens with CUDA graphs, on 1 GPU and on 2 GPUs
(NCCL). Speedup = ``t(TP1) / t(TP2)``.

The per-step split comes from the PyTorch profiler over eager runs of the same static step (the
kernels a graph replays are the same): GPU time of ``F.linear`` calls (GEMMs), of the attention
backend (KV write, gather, SDPA), of NCCL kernels (all-reduce; under TP 2 also the logits
all-gather), and the rest (norms, RoPE, activations, embedding). The kernel sum is below the
eager wall time by the launch gaps that the graph removes.

    python bench/bench_tp_scaling.py                # llama-7b-shape, TP 1 and 2
    python bench/bench_tp_scaling.py --cpu          # miniature on gloo
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from bench_decode import decode_step_fns
from hybridpar import launch
from hybridpar.bench import bench_env, build_model, format_table, median, time_fn, write_results
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel
from hybridpar.models.decode_attention import StaticDecodeBackend

CATEGORIES = ("gemm", "attention", "communication", "other")


def profile_breakdown(step, device: torch.device, steps: int = 5) -> dict[str, float]:
    """Seconds of GPU kernel time per step in each category (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    linear, attn_forward = F.linear, StaticDecodeBackend.forward

    def timed_linear(*args, **kwargs):
        with record_function("hp::gemm"):
            return linear(*args, **kwargs)

    def timed_attention(self, *args, **kwargs):
        with record_function("hp::attention"):
            return attn_forward(self, *args, **kwargs)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    F.linear, StaticDecodeBackend.forward = timed_linear, timed_attention
    try:
        step()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
    finally:
        F.linear, StaticDecodeBackend.forward = linear, attn_forward
    time_attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    out = dict.fromkeys(CATEGORIES, 0.0)
    total = 0.0
    for evt in prof.key_averages():
        if evt.key in ("hp::gemm", "hp::attention"):
            out[evt.key[4:]] += getattr(evt, time_attr) / 1e6 / steps
    if device.type == "cuda":
        for evt in prof.key_averages():  # kernel rows: their own GPU time
            if getattr(evt, "device_type", None) == torch.autograd.DeviceType.CUDA:
                seconds = evt.self_device_time_total / 1e6 / steps
                total += seconds
                if "nccl" in evt.key.lower():
                    out["communication"] += seconds
        out["other"] = max(total - out["gemm"] - out["attention"] - out["communication"], 0.0)
        out["kernel_total"] = total
    return out


def worker(name: str, batches: list[int], context: int, iters: int, dtype_name: str) -> list[dict]:
    tp = dist.get_world_size()
    initialize_tensor_parallel(tp)
    device = current_device()
    model = build_model(name, device, getattr(torch, dtype_name), get_tp_group())
    rows = []
    for batch in batches:
        modes = ["static", "graph"] if device.type == "cuda" else ["static"]
        fns, keep = decode_step_fns(model, batch, context, modes)
        row = {"model": name, "tp": tp, "batch": batch, "context": context}
        with torch.no_grad():
            for mode, fn in fns.items():
                try:
                    row[f"{mode}_s"] = median(time_fn(fn, device, iters=iters, warmup=3))
                except Exception as exc:  # e.g. a collective that cannot be captured: report, keep going
                    row[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"[:500]
            try:
                for k, v in profile_breakdown(fns["static"], device).items():
                    row[f"{k}_s"] = v
            except Exception as exc:
                row["profile_error"] = f"{type(exc).__name__}: {exc}"[:500]
        row["step_s"] = row.get("graph_s", row["static_s"])
        rows.append(row)
        del fns, keep
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="miniature: llama-tiny on gloo (fp32)")
    p.add_argument("--model", default=None)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args(argv)
    if args.cpu:
        model, batches, context, iters, dtype, backend = args.model or "llama-tiny", [1, 8], 64, 5, "float32", "gloo"
    else:
        if torch.cuda.device_count() < 2:
            p.error("needs 2 GPUs; use --cpu for the gloo miniature")
        model, batches, context, iters, dtype, backend = (args.model or "llama-7b-shape", args.batches, args.context,
                                                          args.iters, "bfloat16", "nccl")
    rows = []
    for tp in (1, 2):
        rows += launch(worker, tp, model, batches, context, iters, dtype, backend=backend, timeout=1200)[0]
    t1 = {r["batch"]: r["step_s"] for r in rows if r["tp"] == 1}
    for r in rows:
        r["speedup_vs_tp1"] = t1[r["batch"]] / r["step_s"]
        for k in ("step", "static", "gemm", "attention", "communication", "other", "kernel_total"):
            if f"{k}_s" in r:
                r[f"{k}_ms"] = r[f"{k}_s"] * 1e3
    print(f"{model}: decode step at context {context} ({dtype}); GPU time per step by category (ms)")
    print(format_table(rows, [("tp", "TP", "d"), ("batch", "B", "d"), ("step_ms", "step ms", ".3f"),
                              ("speedup_vs_tp1", "speedup", ".2f"), ("static_ms", "eager ms", ".3f"),
                              ("gemm_ms", "GEMM", ".3f"), ("attention_ms", "attention", ".3f"),
                              ("communication_ms", "all-reduce", ".3f"), ("other_ms", "other", ".3f"),
                              ("kernel_total_ms", "kernels", ".3f")]))
    res = {"model": model, "context": context, "dtype": dtype, "rows": rows}
    path = write_results("tp_scaling", res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
