"""TP 1 versus TP 2: decode-step time of one model, and where each step's GPU time goes.

The same random bf16 weights (drawn identically on every rank, each rank keeping its shard) run
a decode step of ``B`` requests at ``--context`` tokens with CUDA graphs, on 1 GPU and on 2 GPUs
(NCCL). Speedup = ``t(TP1) / t(TP2)``.

The per-step split times each category *alone*: one eager step records every ``F.linear`` call
(GEMMs), every attention-backend call (KV write, gather, SDPA) and every collective (all-reduces;
under TP 2 also the logits all-gather) with its inputs, and each category is replayed by itself
from a CUDA graph (:func:`component_times`). ``other`` is the rest of the graph step: norms,
RoPE, activations, embedding, residual adds and the gaps between kernels. (A profiler over eager
steps misleads here: an NCCL kernel's time includes waiting for the slower rank.)

    python bench/bench_tp_scaling.py                # llama-7b-shape, TP 1 and 2
    python bench/bench_tp_scaling.py --cpu          # miniature on gloo
"""
from __future__ import annotations

import argparse
import functools
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

def component_times(model, batch: int, context: int, device: torch.device, iters: int) -> dict[str, float]:
    """Seconds per step of each category, each replayed alone (a CUDA graph of just those calls on a GPU).

    One eager static step records every ``F.linear`` call (GEMMs), every attention-backend call
    and every collective (``dist.all_reduce`` / ``all_gather_into_tensor``) with its inputs; each
    category is then replayed on its own and timed. ``other`` is the full graph step minus the
    three (norms, RoPE, activations, embedding, residual adds, the gaps between kernels).
    """
    from hybridpar.models.attention_backend import ForwardBatch, ForwardMode
    from hybridpar.models.cuda_graph import ContiguousDecodeRunner

    runner = ContiguousDecodeRunner(model, batch, context, use_cuda_graph=False)
    for b in runner.cache.k_buffer + runner.cache.v_buffer:
        b.normal_()
    rows = runner.cache.alloc(batch)
    ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    calls: dict[str, list] = {"gemm": [], "attention": [], "communication": []}
    linear, attn_forward = F.linear, StaticDecodeBackend.forward
    all_reduce, all_gather = dist.all_reduce, dist.all_gather_into_tensor

    def rec_linear(x, w, b=None):
        calls["gemm"].append((x.clone(), w, b))
        return linear(x, w, b)

    def rec_attention(self, layer_id, q, k, v, fb):
        calls["attention"].append((self, layer_id, q.clone(), k.clone(), v.clone()))
        return attn_forward(self, layer_id, q, k, v, fb)

    def rec_all_reduce(t, *args, **kwargs):
        calls["communication"].append(("all_reduce", t.clone(), kwargs.get("group")))
        return all_reduce(t, *args, **kwargs)

    def rec_all_gather(out, t, *args, **kwargs):
        calls["communication"].append(("all_gather", (out.clone(), t.clone()), kwargs.get("group")))
        return all_gather(out, t, *args, **kwargs)

    F.linear, StaticDecodeBackend.forward = rec_linear, rec_attention
    dist.all_reduce, dist.all_gather_into_tensor = rec_all_reduce, rec_all_gather
    try:
        with torch.no_grad():
            runner.decode(rows, [context] * batch, ids)
    finally:
        F.linear, StaticDecodeBackend.forward = linear, attn_forward
        dist.all_reduce, dist.all_gather_into_tensor = all_reduce, all_gather
    fb = ForwardBatch(ForwardMode.DECODE, [], [], [], ids, None)

    def replay(category: str) -> None:
        for c in calls[category]:
            if category == "gemm":
                linear(*c)
            elif category == "attention":
                attn_forward(c[0], c[1], c[2], c[3], c[4], fb)
            elif c[0] == "all_reduce":
                all_reduce(c[1], group=c[2])
            else:
                all_gather(c[1][0], c[1][1], group=c[2])

    out = {}
    for category in calls:
        fn = functools.partial(replay, category)
        if device.type == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            fn = graph.replay
        with torch.no_grad():
            out[category] = median(time_fn(fn, device, iters=iters, warmup=3))
    out["calls"] = {k: len(v) for k, v in calls.items()}
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
                parts = component_times(model, batch, context, device, iters)
                row["calls"] = parts.pop("calls")
                row.update({f"{k}_s": v for k, v in parts.items()})
                step = row.get("graph_s", row["static_s"])
                row["other_s"] = max(step - sum(parts.values()), 0.0)
            except Exception as exc:
                row["breakdown_error"] = f"{type(exc).__name__}: {exc}"[:500]
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
        model, batches, context, iters, dtype, backend = args.model or "llama-tiny", [1, 4], 64, 3, "float32", "gloo"
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
        for k in ("step", "static", "gemm", "attention", "communication", "other"):
            if f"{k}_s" in r:
                r[f"{k}_ms"] = r[f"{k}_s"] * 1e3
    print(f"{model}: decode step at context {context} ({dtype}); each category replayed alone (ms)")
    print(format_table(rows, [("tp", "TP", "d"), ("batch", "B", "d"), ("step_ms", "step ms", ".3f"),
                              ("speedup_vs_tp1", "speedup", ".2f"), ("static_ms", "eager ms", ".3f"),
                              ("gemm_ms", "GEMM", ".3f"), ("attention_ms", "attention", ".3f"),
                              ("communication_ms", "all-reduce", ".3f"), ("other_ms", "other", ".3f")]))
    for r in rows:
        for k in [k for k in r if k.endswith("_error")]:
            print(f"ERROR TP{r['tp']} B={r['batch']} {k}: {r[k]}")
    res = {"model": model, "context": context, "dtype": dtype, "rows": rows}
    path = write_results("tp_scaling", res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
