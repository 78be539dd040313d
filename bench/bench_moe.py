"""MoE decode step on one GPU against its roofline, counting only the weights the step reads.

A mixture-of-experts step does not read every weight: each token visits ``top_k`` experts, so a
batch of ``B`` tokens reads the experts that at least one of its tokens picked. The roofline here
counts exactly those, per layer, from the router's real choices in the timed step
(:class:`~hybridpar.layers.moe_dispatch.DispatchRecord`):

    weight bytes = dense weights (attention, norms, router, shared expert, LM head)
                 + B rows of the embedding + sum over layers of (experts hit x bytes per expert)
    t_roof = (weight bytes + B * context * KV bytes per token) / bandwidth

with the bandwidth measured by a device-to-device copy. The step is the model's forward over a
contiguous KV cache (``reference`` of ``bench_decode.py``; the CUDA-graph paths do not take MoE
layers), timed as the median of ``--iters`` steps with CUDA events, and the same tensor-parallel
experts code that the CPU tests check against transformers (one expert after another).

    python bench/bench_moe.py                 # GPU: qwen1.5-moe-a2.7b-shape, batch 1 and 32
    python bench/bench_moe.py --cpu           # miniature: qwen2-moe-tiny, fp32, CPU
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

from bench_decode import decode_step_fns, kv_bytes_per_token, param_bytes
from hybridpar import launch
from hybridpar.bench import bench_env, build_model, copy_bandwidth, format_table, median, time_fn, write_results
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel
from hybridpar.layers.fused_moe import FusedMoE


def read_weight_bytes(model: torch.nn.Module, batch: int, experts_hit: list[int]) -> int:
    """Weight bytes one decode step of ``batch`` tokens reads (module docstring)."""
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    expert_bytes = sum(p.numel() * p.element_size() for m in layers for p in (m.w13_weight, m.w2_weight))
    per_expert = expert_bytes // sum(m.num_local_experts for m in layers)
    embed = model.model.embed_tokens.weight
    row = embed.shape[1] * embed.element_size()
    return param_bytes(model) - expert_bytes - embed.numel() * embed.element_size() + batch * row \
        + sum(experts_hit) * per_expert


def worker(name: str, batches: list[int], context: int, iters: int, dtype_name: str, copy_bytes: int) -> dict:
    initialize_tensor_parallel(1)
    device = current_device()
    bandwidth = copy_bandwidth(device, copy_bytes)
    model = build_model(name, device, getattr(torch, dtype_name), get_tp_group())
    layers = [m for m in model.modules() if isinstance(m, FusedMoE)]
    kv_tok = kv_bytes_per_token(model)
    rows = []
    for batch in batches:
        fns, keep = decode_step_fns(model, batch, context, ["reference"])
        step = fns["reference"]
        with torch.no_grad():
            for m in layers:
                m.records = []
            step()  # the timed steps feed the same tokens: they hit the same experts
            hit = [sum(c > 0 for c in m.records[0].expert_counts) for m in layers]
            for m in layers:
                m.records = None
            samples = time_fn(step, device, iters=iters, warmup=3)
        weights, kv = read_weight_bytes(model, batch, hit), batch * context * kv_tok
        t = median(samples)
        roof = (weights + kv) / bandwidth
        rows.append({"model": name, "batch": batch, "context": context, "experts_hit_per_layer": hit,
                     "mean_experts_hit": statistics.mean(hit), "read_weight_bytes": weights,
                     "all_weight_bytes": param_bytes(model), "kv_bytes": kv, "roofline_s": roof, "step_s": t,
                     "step_s_min": min(samples), "step_s_max": max(samples), "roofline_frac": roof / t,
                     "tok_s": batch / t})
        del fns, keep
    return {"copy_bandwidth": bandwidth, "context": context, "dtype": dtype_name, "iters": iters, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="miniature: qwen2-moe-tiny, fp32, gloo, CPU")
    p.add_argument("--model", default=None)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    p.add_argument("--context", type=int, default=512, help="KV tokens per request after the step")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    if args.cpu:
        name, context, iters, dtype, backend, copy_bytes = args.model or "qwen2-moe-tiny", 64, 5, "float32", "gloo", 64 << 20
    else:
        if not torch.cuda.is_available():
            p.error("no GPU: use --cpu for the miniature")
        name, context, iters, dtype, backend = args.model or "qwen1.5-moe-a2.7b-shape", args.context, args.iters, "bfloat16", "nccl"
        copy_bytes = 4 << 30
    res = launch(worker, 1, name, args.batches, context, iters, dtype, copy_bytes, backend=backend, timeout=1200)[0]
    print(f"MoE decode step, context {context}, {dtype}; copy bandwidth {res['copy_bandwidth'] / 1e12:.2f} TB/s")
    for r in res["rows"]:
        r.update(step_ms=r["step_s"] * 1e3, roofline_ms=r["roofline_s"] * 1e3, read_gb=r["read_weight_bytes"] / 1e9,
                 all_gb=r["all_weight_bytes"] / 1e9, spread_ms=(r["step_s_max"] - r["step_s_min"]) * 1e3)
    print(format_table(res["rows"], [("model", "model", ""), ("batch", "B", "d"),
                                     ("mean_experts_hit", "experts hit/layer", ".1f"), ("read_gb", "GB read", ".2f"),
                                     ("all_gb", "GB stored", ".2f"), ("roofline_ms", "roof ms", ".3f"),
                                     ("step_ms", "step ms", ".3f"), ("spread_ms", "max-min ms", ".3f"),
                                     ("roofline_frac", "of roof", ".3f"), ("tok_s", "tok/s", ".0f")]))
    path = write_results("moe_decode", res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
