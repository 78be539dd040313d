"""Token parallelism versus TP and DP at equal GPU count (2 or 4): decode throughput, KV capacity, cost model.

Configurations of the same model on ``g`` GPUs (``--gpus``, default 2):

* **TP g**: every layer split over all GPUs, two all-reduces per layer;
* **DP g**: ``g`` independent replicas, each decoding ``B / g`` of the batch (measured as TP 1 with
  ``B / g`` requests; the replicas never talk, so they run side by side at the same speed);
* **TKNP g**: the root holds the whole model and computes Q/K/V for the whole batch; every layer
  it scatters the other ranks' requests' Q/K/V, every rank attends over its own KV cache, the
  outputs are gathered back (:class:`~hybridpar.tknp.attention.TokenParallelAttention`);
* **TP 2 x TKNP g/2** (``g >= 4``): two roots hold the model split TP 2 and each scatters its half
  of the heads over its own TKNP group.

For each context length (1K .. 32K) and batch size, every request holds ``ctx`` tokens of random
KV and one decode step is timed (median, host included). TKNP's step cannot be graph-captured (its
plan is broadcast as a Python object every step), so all of them are timed *eagerly* over the same
contiguous-cache backend; TP and DP are also timed with CUDA graphs, their best. Grid points
whose KV would not fit in a GPU are skipped. A profile of the TKNP root splits its step into QKV
GEMM, scatter, attention, gather and O-projection/MLP.

The cost model (:mod:`hybridpar.tknp.cost_model`) is fitted to micro-benchmarks of its pieces
(GEMMs, decode attention, all-reduce in every TP group size used, scatter/gather over the
``g``-rank TKNP group, at a few sizes), with one per-layer host overhead per configuration
calibrated on the smallest grid point; its predictions are compared with every other measured
point. Maximum concurrent KV tokens come from :func:`~hybridpar.tknp.memory.compare_strategies`
at this GPU's memory.

    python bench/bench_tknp.py                    # llama-7b-shape on 2 GPUs
    python bench/bench_tknp.py --gpus 4           # TP 4, DP 4, TKNP 4, TP 2 x TKNP 2
    python bench/bench_tknp.py --cpu              # miniature: llama-tiny on gloo
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Config:
    """One way to use ``gpus`` GPUs: ``strategy`` (tp, dp, tknp) and, for TKNP, its TP size ``tp``."""

    strategy: str
    gpus: int
    tp: int = 1

    @property
    def key(self) -> str:
        return cm.config_key(self.strategy, self.step(1, 1))

    @property
    def label(self) -> str:
        g, t = self.gpus, self.tp
        if self.strategy == "tknp":
            return f"TP{t}xTKNP{g // t}" if t > 1 else f"TKNP{g}"
        return f"{self.strategy.upper()}{g}"

    def step(self, batch: int, ctx: int) -> cm.StepShape:
        return cm.StepShape(batch, ctx, self.gpus, tensor_parallel_size=self.tp if self.strategy == "tknp" else 1)


def configs_for(gpus: int) -> list[Config]:
    """TP g, DP g, TKNP g and, from 4 GPUs on, TP 2 x TKNP g/2."""
    out = [Config("tp", gpus), Config("dp", gpus), Config("tknp", gpus)]
    return out + ([Config("tknp", gpus, 2)] if gpus >= 4 else [])


def fits(shape, batch: int, ctx: int, config: Config, mem_bytes: float) -> bool:
    """Whether the step's weights + KV fit in ``0.85`` of a GPU on the busiest rank."""
    tp, ways = cm.split_sizes(config.strategy, config.step(batch, ctx))
    if batch % ways:
        return False
    w = (cm.layer_weight_bytes(shape, tp) * shape.num_layers + 2 * cm.lm_head_bytes(shape, tp))
    kv = batch // ways * ctx * cm.layer_kv_bytes_per_token(shape, tp) * shape.num_layers
    return (w + kv) * 1.15 < 0.85 * mem_bytes  # +15 %: the decode gather's temporaries


def timed_step(step, device, iters: int) -> float:
    """Median wall seconds of ``step`` (it ends in a host sync: the sampled ids come back)."""
    return median(time_fn(step, device, iters=iters, warmup=2))


# ------------------------------------------------------------------ micro-benchmarks (cost-model inputs)
def micro_benchmarks(config, device: torch.device, dtype: torch.dtype, iters: int, batch: int,
                     contexts: list[int], all_reduce_sizes: list[int]) -> dict:
    """Times of the cost model's pieces at a few sizes. Collective: every rank of the world calls it.

    Scatter/gather sizes are the bytes the root sends (receives) in all: ``(world - 1)`` pieces.
    """
    h, f, d = config.hidden_size, config.intermediate_size, config.head_dim
    hq, hkv = config.num_heads, config.num_kv_heads
    rank = dist.get_rank()
    out: dict = {"gemm": [], "attention": [], "scatter": [], "gather": []}
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

    world = dist.get_world_size()
    for n in all_reduce_sizes:  # every rank sits in one TP group of n ranks; rank 0's group is timed
        parallel_groups(n, world)
        group = get_tp_group()
        out[f"all_reduce_{n}"] = []
        for b in (1, 8, 32, 128):
            y = torch.randn(b, h, device=device, dtype=dtype)
            t = median(time_fn(lambda: all_reduce_(y, group), device, iters=iters))
            out[f"all_reduce_{n}"].append((b * h * dtype.itemsize, t))
        destroy_model_parallel()
    initialize_tensor_parallel(world)  # scatter / gather over all ranks: the TKNP-g group
    group = get_tp_group()
    for remote in (1, 4, 16, 64):
        sizes = [remote] * world
        packed = torch.randn(world * remote, hq + 2 * hkv, d, device=device, dtype=dtype)
        t = median(time_fn(lambda: scatterv(packed, sizes, src=0, dim=0, group=group), device, iters=iters))
        out["scatter"].append(((world - 1) * remote * (hq + 2 * hkv) * d * dtype.itemsize, t))
        o = torch.randn(remote, hq, d, device=device, dtype=dtype)
        t = median(time_fn(lambda: gatherv(o, sizes, dst=0, dim=0, group=group), device, iters=iters))
        out["gather"].append(((world - 1) * remote * hq * d * dtype.itemsize, t))
    destroy_model_parallel()
    return out


def parallel_groups(tp: int, world: int) -> None:
    """TP groups of ``tp`` ranks; the rest of the world as TKNP (``initialize_model_parallel``)."""
    if tp == world:
        initialize_tensor_parallel(tp)
    else:
        initialize_model_parallel(tensor_parallel_size=tp, token_parallel_size=world // tp)


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


def tknp_worker(name: str, grid: list[tuple[int, int]], iters: int, dtype_name: str, tp: int,
                micro: list[int] | None, contexts: list[int]) -> dict:
    """TP ``tp`` x TKNP ``world / tp``: every TKNP rank holds ``B / k`` requests. ``micro``: also run
    the micro-benchmarks, timing all-reduces in groups of these sizes."""
    from hybridpar.tknp.attention import AttentionGeometry, TknpForwardBatch, TokenParallelAttention
    from hybridpar.tknp.worker import AttentionWorker

    device, dtype = current_device(), getattr(torch, dtype_name)
    config = model_config(name)
    result: dict = {"rows": []}
    if micro:
        result["micro"] = micro_benchmarks(config, device, dtype, iters, max(b for _, b in grid), contexts, micro)
    world = dist.get_world_size()
    initialize_model_parallel(tensor_parallel_size=tp, token_parallel_size=world // tp)
    group, tp_group = get_tknp_group(), get_tp_group()
    root, k = group.is_first_rank, group.world_size
    geometry = AttentionGeometry.from_config(config, tp_group.world_size, tp_group.rank_in_group, dtype)
    model = build_model(name, device, dtype, tp_group) if root else None
    label = Config("tknp", world, tp).label
    for ctx, batch in grid:
        local = batch // k
        cache = ContiguousKVCache(config.num_layers, geometry.num_kv_heads, geometry.head_dim, local, ctx, dtype, device)
        for buf in cache.k_buffer + cache.v_buffer:
            buf.normal_()
        if not root:
            AttentionWorker(cache, geometry, group, device).serve()
            del cache
            continue
        attn = TokenParallelAttention(cache, group, geometry, param_bytes(model))
        ids = torch.randint(0, config.vocab_size, (batch,), device=device)
        if tp_group.world_size > 1:  # the roots decode the same tokens
            dist.broadcast(ids, src=tp_group.first_rank, group=tp_group.device_group)
        ranks, rows = [i // local for i in range(batch)], [i % local for i in range(batch)]

        def step() -> list[int]:
            fb = TknpForwardBatch.build_placed(attn, ranks, rows, [ctx - 1] * batch, [1] * batch, device)
            with torch.no_grad():
                return model.compute_logits(model(ids, fb.positions, fb)).argmax(-1).tolist()

        row = {"strategy": "tknp", "tp": tp, "config": label, "context": ctx, "batch": batch,
               "eager_s": timed_step(step, device, iters)}
        row.update({f"{k_}_s": v for k_, v in tknp_breakdown(model, step, device).items()})
        result["rows"].append(row)
        attn.shutdown()
        del attn, cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def tp_worker(name: str, grid: list[tuple[int, int]], iters: int, dtype_name: str, label: str, gpus: int) -> list[dict]:
    """TP (all ranks) or one DP replica (1 rank, ``B / gpus`` requests): eager reference step and graph step."""
    tp = dist.get_world_size()
    initialize_tensor_parallel(tp)
    device, dtype = current_device(), getattr(torch, dtype_name)
    model = build_model(name, device, dtype, get_tp_group())
    rows = []
    modes = ["reference", "graph"] if device.type == "cuda" else ["reference"]
    for ctx, batch in grid:
        local = batch // gpus if label == "dp" else batch
        row = {"strategy": label, "tp": tp, "config": Config(label, gpus).label, "context": ctx, "batch": batch}
        for mode in modes:  # one cache at a time: at 32K tokens of context two do not fit
            fns, keep = decode_step_fns(model, local, ctx, [mode])
            with torch.no_grad():
                row["eager_s" if mode == "reference" else "graph_s"] = timed_step(fns[mode], device, iters)
            del fns, keep
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def fit_costs(micro: dict, world: int) -> cm.ComponentCosts:
    def fit(key):
        sizes, times = zip(*micro[key])
        return cm.fit_linear(sizes, times)
    by_size = {int(k.rsplit("_", 1)[1]): fit(k) for k in micro if k.startswith("all_reduce_")}
    return cm.ComponentCosts(fit("gemm"), fit("attention"), by_size[world], fit("scatter"), fit("gather"), {}, by_size)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="miniature: llama-tiny on gloo, fp32")
    p.add_argument("--gpus", type=int, default=2, choices=(2, 4), help="GPUs (ranks) per configuration")
    p.add_argument("--model", default=None)
    p.add_argument("--contexts", type=int, nargs="*", default=[1024, 4096, 16384, 32768])
    p.add_argument("--batches", type=int, nargs="*", default=[8, 32])
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args(argv)
    g = args.gpus
    if args.cpu:
        name, contexts, batches, iters, dtype, backend = args.model or "llama-tiny", [64, 256], [g], 3, "float32", "gloo"
        mem = 8 << 30
    else:
        if torch.cuda.device_count() < g:
            p.error(f"needs {g} GPUs, found {torch.cuda.device_count()}; use --cpu for the gloo miniature")
        name, contexts, batches, iters, dtype, backend = (args.model or "llama-7b-shape", args.contexts, args.batches,
                                                          args.iters, "bfloat16", "nccl")
        mem = torch.cuda.get_device_properties(0).total_memory
    shape = shape_of(model_config(name), name)
    configs = configs_for(g)
    grid = [(c, b) for c in contexts for b in batches]
    ok = {cf.key: [(c, b) for c, b in grid if fits(shape, b, c, cf, mem)] for cf in configs}
    common = [pt for pt in grid if all(pt in ok[cf.key] for cf in configs)]
    ar_sizes = sorted({cf.tp for cf in configs if cf.strategy == "tknp" and cf.tp > 1} | {g})
    rows = launch(tp_worker, g, name, ok["tp"], iters, dtype, "tp", g, backend=backend, timeout=1800)[0]
    rows += launch(tp_worker, 1, name, ok["dp"], iters, dtype, "dp", g, backend=backend, timeout=1800)[0]
    micro = None
    for cf in configs:
        if cf.strategy == "tknp":
            tk = launch(tknp_worker, g, name, ok[cf.key], iters, dtype, cf.tp, ar_sizes if micro is None else None,
                        contexts, backend=backend, timeout=1800)[0]
            micro = micro or tk["micro"]
            rows += tk["rows"]
    for r in rows:
        r["eager_tok_s"] = r["batch"] / r["eager_s"]
        if "graph_s" in r:
            r["graph_tok_s"] = r["batch"] / r["graph_s"]
    # cost model: fit, calibrate one overhead per configuration at the smallest common point, predict the rest
    costs = fit_costs(micro, g)
    calib = min(common) if common else None
    overhead = {}
    by_label = {cf.label: cf for cf in configs}
    for cf in configs:
        m = next((r for r in rows if r["config"] == cf.label and (r["context"], r["batch"]) == calib), None)
        if m is not None:
            overhead[cf.key] = cm.calibrate_overhead(cf.strategy, shape, cf.step(m["batch"], m["context"]), costs,
                                                     m["eager_s"])
    costs = costs.with_overhead(overhead)
    for r in rows:
        cf = by_label[r["config"]]
        step = cf.step(r["batch"], r["context"])
        r["predicted_s"] = cm.predict_step(cf.strategy, shape, step, costs)
        r["prediction_error"] = cm.relative_error(r["predicted_s"], r["eager_s"])
        r["calibration_point"] = (r["context"], r["batch"]) == calib
        r["predicted_components_s"] = cm.step_components(cf.strategy, shape, step, costs)
    errors = [abs(r["prediction_error"]) for r in rows if not r["calibration_point"]]
    plans = {}
    for t in sorted({cf.tp for cf in configs if cf.strategy == "tknp"}):
        for pl in compare_strategies(shape, g, int(0.9 * mem), tknp_tensor_parallel_size=t):
            plans.setdefault(pl.label, pl)
    capacity = [{"plan": pl.label, "kv_tokens_total": pl.kv_tokens_total, "max_request_tokens": pl.max_request_tokens,
                 "weights_bytes": pl.total_param_bytes} for pl in plans.values() if not pl.error]
    order = {cf.label: i for i, cf in enumerate(configs)}
    rows.sort(key=lambda r: (r["context"], r["batch"], order[r["config"]]))
    for r in rows:
        r["eager_ms"], r["pred_ms"] = r["eager_s"] * 1e3, r["predicted_s"] * 1e3
        r["graph_ms"] = r["graph_s"] * 1e3 if "graph_s" in r else None
        r["err_pct"] = 100 * r["prediction_error"]
    print(f"{name} on {g} devices ({dtype}): decode step per configuration")
    print(format_table(rows, [("context", "ctx", "d"), ("batch", "B", "d"), ("config", "config", ""),
                              ("eager_ms", "eager ms", ".2f"), ("eager_tok_s", "tok/s", ".0f"),
                              ("graph_ms", "graph ms", ".2f"), ("graph_tok_s", "tok/s", ".0f"),
                              ("pred_ms", "model ms", ".2f"), ("err_pct", "err %", "+.0f")]))
    tk_rows = [r for r in rows if r["strategy"] == "tknp"]
    for r in tk_rows:
        for k in ("qkv", "scatter", "attention", "gather", "o_mlp"):
            r[f"{k}_ms"] = r.get(f"{k}_s", 0.0) * 1e3
    print("\nTKNP root, GPU time per step (ms)")
    print(format_table(tk_rows, [("context", "ctx", "d"), ("batch", "B", "d"), ("config", "config", ""),
                                 ("qkv_ms", "QKV", ".2f"), ("scatter_ms", "scatter", ".2f"),
                                 ("attention_ms", "attention", ".2f"), ("gather_ms", "gather", ".2f"),
                                 ("o_mlp_ms", "O/MLP", ".2f"), ("eager_ms", "step", ".2f")]))
    print(f"\nmaximum concurrent KV tokens ({g} GPUs, 90 % of memory each)")
    print(format_table(capacity, [("plan", "plan", ""), ("kv_tokens_total", "KV tokens", ",d"),
                                  ("max_request_tokens", "longest request", ",d")]))
    if errors:
        print(f"\ncost model: mean |error| {100 * sum(errors) / len(errors):.1f} %, max {100 * max(errors):.1f} % "
              f"over {len(errors)} points (calibrated at ctx={calib[0]}, B={calib[1]})")
    res = {"model": name, "dtype": dtype, "gpus": g, "configs": [cf.label for cf in configs],
           "gpu_memory_bytes": mem, "grid": grid, "skipped": {cf.label: [pt for pt in grid if pt not in ok[cf.key]]
                                                               for cf in configs},
           "rows": rows, "micro": micro,
           "costs": {k: vars(getattr(costs, k)) for k in ("gemm", "attention", "all_reduce", "scatter", "gather")},
           "all_reduce_by_size": {n: vars(c) for n, c in costs.all_reduce_by_size.items()},
           "overhead_per_layer_s": overhead, "calibration_point": calib, "capacity": capacity,
           "mean_abs_error": sum(errors) / len(errors) if errors else None, "max_abs_error": max(errors, default=None)}
    path = write_results("tknp" if g == 2 else f"tknp{g}", res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
