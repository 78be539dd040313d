"""Token parallelism versus TP and DP at equal GPU count (2): decode throughput, KV capacity, cost model.

Configurations of the same model on ``g = 2`` GPUs:

* **TP 2**: every layer split over both GPUs, two all-reduces per layer;
* **DP 2**: two independent replicas, each decoding half of the batch (measured as TP 1 with
  ``B / 2`` requests; the replicas never talk, so two run side by side at the same speed);
* **TKNP 2**: the root holds the whole model and computes Q/K/V for the whole batch; every layer
  it scatters the other rank's requests' Q/K/V, both ranks attend over their own KV cache, the
  outputs are gathered back (:class:`~hybridpar.tknp.attention.TokenParallelAttention`).

For each context length (1K .. 32K) and batch size, every request holds ``ctx`` tokens of random
KV and one decode step is timed (median, host included). TKNP's step cannot be graph-captured (its
plan is broadcast as a Python object every step), so all three are timed *eagerly* over the same
contiguous-cache backend; TP 2 and DP 2 are also timed with CUDA graphs, their best. Grid points
whose KV would not fit in a GPU are skipped. A profile of the TKNP root splits its step into QKV
GEMM, scatter, attention, gather and O-projection/MLP.

The cost model (:mod:`hybridpar.tknp.cost_model`) is fitted to micro-benchmarks of its pieces
(GEMMs, decode attention, all-reduce, scatter/gather at a few sizes), with one per-layer host
overhead per strategy calibrated on the smallest grid point; its predictions are compared with
every other measured point. Maximum concurrent KV tokens come from
:func:`~hybridpar.tknp.memory.compare_strategies` at this GPU's memory.

    python bench/bench_tknp.py                    # llama-7b-shape on 2 GPUs
    python bench/bench_tknp.py --cpu              # miniature: llama-tiny on gloo
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

from bench_decode import decode_step_fns, param_bytes
from hybridpar import launch
from hybridpar.bench import bench_env, build_model, format_table, median, model_config, synchronize, time_fn, write_results
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import (
    destroy_model_parallel,
    get_tknp_group,
    get_tp_group,
    initialize_model_parallel,
    initialize_tensor_parallel,
)
from hybridpar.models.attention_backend import ContiguousKVCache, ForwardBatch
from hybridpar.tknp import cost_model as cm
from hybridpar.tknp.memory import compare_strategies, shape_of


def fits(shape, batch: int, ctx: int, strategy: str, mem_bytes: float) -> bool:
    """Whether the step's weights + KV fit in ``0.85`` of a GPU on the busiest rank."""
    w = cm.layer_weight_bytes(shape, 1) * shape.num_layers + 2 * cm.lm_head_bytes(shape)
    kv_tok = cm.layer_kv_bytes_per_token(shape, 1) * shape.num_layers
    need = {"tp": (w + batch * ctx * kv_tok) / 2, "dp": w + batch // 2 * ctx * kv_tok,
            "tknp": w + batch // 2 * ctx * kv_tok}[strategy]
    return need * 1.15 < 0.85 * mem_bytes  # +15 %: the decode gather's temporaries


def timed_step(step, device, iters: int) -> float:
    """Median wall seconds of ``step`` (it ends in a host sync: the sampled ids come back)."""
    return median(time_fn(step, device, iters=iters, warmup=2))


# ------------------------------------------------------------------ micro-benchmarks (cost-model inputs)
def micro_benchmarks(config, device: torch.device, dtype: torch.dtype, iters: int, batch: int,
                     contexts: list[int]) -> dict:
    """Times of the cost model's pieces at a few sizes. Collective: both ranks of the world call it."""
    h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    hq, hkv = config.num_heads, config.num_kv_heads
    rank = dist.get_rank()
    out: dict = {"gemm": [], "attention": [], "all_reduce": [], "scatter": [], "gather": []}
    if rank == 0:
        x = torch.randn(batch, max(h, f), device=device, dtype=dtype)
        for n, k in [(h, h), ((hq + 2 * hkv) * d, h), (h, f), (2 * f, h)]:
            w = torch.randn(n, k, device=device, dtype=dtype)
            t = median(time_fn(lambda: F.linear(x[:, :k], w), device, iters=iters))
            out["gemm"].append((n * k * dtype.itemsize, t))
        for b, ctx in [(1, contexts[0]), (max(batch // 4, 1), contexts[-1] // 4), (max(batch // 2, 1), contexts[-1])]:
            cache = ContiguousKVCache(1, hkv, d, b, ctx, dtype, device)
            cache.k_buffer[0].normal_(), cache.v_buffer[0].normal_()
            fb = ForwardBatch.build(cache, list(range(b)), [ctx - 1] * b, [1] * b, device)
            q, k, v = (torch.randn(b, hh, d, device=device, dtype=dtype) for hh in (hq, hkv, hkv))
            t = median(time_fn(lambda: cache.forward(0, q, k, v, fb), device, iters=iters))
            out["attention"].append((2 * b * ctx * hkv * d * dtype.itemsize, t))
            del cache
    from hybridpar.distributed.communication_op import all_reduce_, gatherv, scatterv

    initialize_tensor_parallel(dist.get_world_size())
    group = get_tp_group()
    for b in (1, 8, 32, 128):
        y = torch.randn(b, h, device=device, dtype=dtype)
        t = median(time_fn(lambda: all_reduce_(y, group), device, iters=iters))
        out["all_reduce"].append((b * h * dtype.itemsize, t))
    for remote in (1, 4, 16, 64):
        sizes = [remote, remote]
        packed = torch.randn(2 * remote, hq + 2 * hkv, d, device=device, dtype=dtype)
        t = median(time_fn(lambda: scatterv(packed, sizes, src=0, dim=0, group=group), device, iters=iters))
        out["scatter"].append((remote * (hq + 2 * hkv) * d * dtype.itemsize, t))
        o = torch.randn(remote, hq, d, device=device, dtype=dtype)
        t = median(time_fn(lambda: gatherv(o, sizes, dst=0, dim=0, group=group), device, iters=iters))
        out["gather"].append((remote * hq * d * dtype.itemsize, t))
    destroy_model_parallel()
    return out


# ------------------------------------------------------------------ TKNP step and its profile
def tknp_breakdown(model, step, device) -> dict[str, float]:
    """Seconds per step of the root's QKV GEMMs, scatter, attention, gather, other GEMMs (profiler)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import hybridpar.tknp.attention as tknp_attention

    qkv_ids = {id(layer.self_attn.qkv_proj.weight) for layer in model.model.layers}
    linear, scatterv, gatherv, attn_fwd = F.linear, tknp_attention.scatterv, tknp_attention.gatherv, ContiguousKVCache.forward

    def wrap(name, fn):
        def inner(*args, **kwargs):
            with record_function(name):
                return fn(*args, **kwargs)
        return inner

    def timed_linear(x, w, *args, **kwargs):
        with record_function("hp::qkv" if id(w) in qkv_ids else "hp::o_mlp"):
            return linear(x, w, *args, **kwargs)

    F.linear = timed_linear
    tknp_attention.scatterv, tknp_attention.gatherv = wrap("hp::scatter", scatterv), wrap("hp::gather", gatherv)
    ContiguousKVCache.forward = wrap("hp::attention", attn_fwd)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    steps = 3
    try:
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
    finally:
        F.linear, tknp_attention.scatterv, tknp_attention.gatherv = linear, scatterv, gatherv
        ContiguousKVCache.forward = attn_fwd
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    out = {}
    for evt in prof.key_averages():
        if evt.key.startswith("hp::"):
            out[evt.key[4:]] = getattr(evt, attr) / 1e6 / steps
    return out


def tknp_worker(name: str, grid: list[tuple[int, int]], iters: int, dtype_name: str, micro: bool,
                contexts: list[int]) -> dict:
    from hybridpar.tknp.attention import AttentionGeometry, TknpForwardBatch, TokenParallelAttention
    from hybridpar.tknp.worker import AttentionWorker

    device, dtype = current_device(), getattr(torch, dtype_name)
    config = model_config(name)
    result: dict = {"rows": []}
    if micro:
        result["micro"] = micro_benchmarks(config, device, dtype, iters, max(b for _, b in grid), contexts)
    initialize_model_parallel(token_parallel_size=dist.get_world_size())
    group = get_tknp_group()
    root = group.is_first_rank
    geometry = AttentionGeometry.from_config(config, 1, 0, dtype)
    model = build_model(name, device, dtype, get_tp_group()) if root else None
    for ctx, batch in grid:
        half = batch // 2
        cache = ContiguousKVCache(config.num_layers, config.num_kv_heads, config.head_dim, half, ctx, dtype, device)
        for buf in cache.k_buffer + cache.v_buffer:
            buf.normal_()
        if not root:
            AttentionWorker(cache, geometry, group, device).serve()
            del cache
            continue
        attn = TokenParallelAttention(cache, group, geometry, param_bytes(model))
        ids = torch.randint(0, config.vocab_size, (batch,), device=device)
        ranks, rows = [0] * half + [1] * half, list(range(half)) * 2

        def step() -> list[int]:
            fb = TknpForwardBatch.build_placed(attn, ranks, rows, [ctx - 1] * batch, [1] * batch, device)
            with torch.no_grad():
                return model.compute_logits(model(ids, fb.positions, fb)).argmax(-1).tolist()

        row = {"strategy": "tknp", "context": ctx, "batch": batch, "eager_s": timed_step(step, device, iters)}
        row.update({f"{k}_s": v for k, v in tknp_breakdown(model, step, device).items()})
        result["rows"].append(row)
        attn.shutdown()
        del attn, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def tp_worker(name: str, grid: list[tuple[int, int]], iters: int, dtype_name: str, label: str) -> list[dict]:
    """TP (all ranks) or one DP replica (1 rank, half the batch): eager reference step and graph step."""
    tp = dist.get_world_size()
    initialize_tensor_parallel(tp)
    device, dtype = current_device(), getattr(torch, dtype_name)
    model = build_model(name, device, dtype, get_tp_group())
    rows = []
    modes = ["reference", "graph"] if device.type == "cuda" else ["reference"]
    for ctx, batch in grid:
        local = batch // 2 if label == "dp" else batch
        row = {"strategy": label, "context": ctx, "batch": batch}
        for mode in modes:  # one cache at a time: at 32K tokens of context two do not fit
            fns, keep = decode_step_fns(model, local, ctx, [mode])
            with torch.no_grad():
                row["eager_s" if mode == "reference" else "graph_s"] = timed_step(fns[mode], device, iters)
            del fns, keep
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def fit_costs(micro: dict) -> cm.ComponentCosts:
    def fit(key):
        sizes, times = zip(*micro[key])
        return cm.fit_linear(sizes, times)
    return cm.ComponentCosts(fit("gemm"), fit("attention"), fit("all_reduce"), fit("scatter"), fit("gather"), {})


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="miniature: llama-tiny on gloo, fp32")
    p.add_argument("--model", default=None)
    p.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 16384, 32768])
    p.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    if args.cpu:
        name, contexts, batches, iters, dtype, backend = args.model or "llama-tiny", [64, 256], [2], 3, "float32", "gloo"
        mem = 8 << 30
    else:
        if torch.cuda.device_count() < 2:
            p.error("needs 2 GPUs; use --cpu for the gloo miniature")
        name, contexts, batches, iters, dtype, backend = (args.model or "llama-7b-shape", args.contexts, args.batches,
                                                          args.iters, "bfloat16", "nccl")
        mem = torch.cuda.get_device_properties(0).total_memory
    shape = shape_of(model_config(name), name)
    grid = [(c, b) for c in contexts for b in batches]
    ok = {s: [(c, b) for c, b in grid if fits(shape, b, c, s, mem)] for s in cm.STRATEGIES}
    common = [g for g in grid if all(g in ok[s] for s in cm.STRATEGIES)]
    rows = launch(tp_worker, 2, name, ok["tp"], iters, dtype, "tp", backend=backend, timeout=1800)[0]
    rows += launch(tp_worker, 1, name, ok["dp"], iters, dtype, "dp", backend=backend, timeout=1800)[0]
    tk = launch(tknp_worker, 2, name, ok["tknp"], iters, dtype, True, contexts, backend=backend, timeout=1800)[0]
    rows += tk["rows"]
    for r in rows:
        r["eager_tok_s"] = r["batch"] / r["eager_s"]
        if "graph_s" in r:
            r["graph_tok_s"] = r["batch"] / r["graph_s"]
    # cost model: fit, calibrate one overhead per strategy at the smallest common point, predict the rest
    costs = fit_costs(tk["micro"])
    calib = min(common) if common else None
    overhead = {}
    for s in cm.STRATEGIES:
        m = next((r for r in rows if r["strategy"] == s and (r["context"], r["batch"]) == calib), None)
        if m is not None:
            overhead[s] = cm.calibrate_overhead(s, shape, cm.StepShape(m["batch"], m["context"]), costs, m["eager_s"])
    costs = cm.ComponentCosts(costs.gemm, costs.attention, costs.all_reduce, costs.scatter, costs.gather, overhead)
    for r in rows:
        step = cm.StepShape(r["batch"], r["context"])
        r["predicted_s"] = cm.predict_step(r["strategy"], shape, step, costs)
        r["prediction_error"] = cm.relative_error(r["predicted_s"], r["eager_s"])
        r["calibration_point"] = (r["context"], r["batch"]) == calib
        r["predicted_components_s"] = cm.step_components(r["strategy"], shape, step, costs)
    errors = [abs(r["prediction_error"]) for r in rows if not r["calibration_point"]]
    plans = compare_strategies(shape, 2, int(0.9 * mem))
    capacity = [{"plan": pl.label, "kv_tokens_total": pl.kv_tokens_total, "max_request_tokens": pl.max_request_tokens,
                 "weights_bytes": pl.total_param_bytes} for pl in plans if not pl.error]
    rows.sort(key=lambda r: (r["context"], r["batch"], r["strategy"]))
    for r in rows:
        r["eager_ms"], r["pred_ms"] = r["eager_s"] * 1e3, r["predicted_s"] * 1e3
        r["graph_ms"] = r["graph_s"] * 1e3 if "graph_s" in r else None
        r["err_pct"] = 100 * r["prediction_error"]
    print(f"{name} on 2 devices ({dtype}): decode step per strategy")
    print(format_table(rows, [("context", "ctx", "d"), ("batch", "B", "d"), ("strategy", "strategy", ""),
                              ("eager_ms", "eager ms", ".2f"), ("eager_tok_s", "tok/s", ".0f"),
                              ("graph_ms", "graph ms", ".2f"), ("graph_tok_s", "tok/s", ".0f"),
                              ("pred_ms", "model ms", ".2f"), ("err_pct", "err %", "+.0f")]))
    tk_rows = [r for r in rows if r["strategy"] == "tknp"]
    for r in tk_rows:
        for k in ("qkv", "scatter", "attention", "gather", "o_mlp"):
            r[f"{k}_ms"] = r.get(f"{k}_s", 0.0) * 1e3
    print("\nTKNP root, GPU time per step (ms)")
    print(format_table(tk_rows, [("context", "ctx", "d"), ("batch", "B", "d"), ("qkv_ms", "QKV", ".2f"),
                                 ("scatter_ms", "scatter", ".2f"), ("attention_ms", "attention", ".2f"),
                                 ("gather_ms", "gather", ".2f"), ("o_mlp_ms", "O/MLP", ".2f"), ("eager_ms", "step", ".2f")]))
    print("\nmaximum concurrent KV tokens (2 GPUs, 90 % of memory each)")
    print(format_table(capacity, [("plan", "plan", ""), ("kv_tokens_total", "KV tokens", ",d"),
                                  ("max_request_tokens", "longest request", ",d")]))
    if errors:
        print(f"\ncost model: mean |error| {100 * sum(errors) / len(errors):.1f} %, max {100 * max(errors):.1f} % "
              f"over {len(errors)} points (calibrated at ctx={calib[0]}, B={calib[1]})")
    res = {"model": name, "dtype": dtype, "gpu_memory_bytes": mem, "grid": grid, "skipped": {
        s: [g for g in grid if g not in ok[s]] for s in cm.STRATEGIES}, "rows": rows, "micro": tk["micro"],
        "costs": {k: vars(getattr(costs, k)) for k in ("gemm", "attention", "all_reduce", "scatter", "gather")},
        "overhead_per_layer_s": overhead, "calibration_point": calib, "capacity": capacity,
        "mean_abs_error": sum(errors) / len(errors) if errors else None, "max_abs_error": max(errors, default=None)}
    path = write_results("tknp", res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
