"""Chapter 7's figures, drawn from the results files in ``bench/results`` (see :mod:`hybridpar.bench`).

Every function takes one results record (``{"name", "meta", "results"}``) and returns the
matplotlib figure; :func:`provenance` is the line each caption carries: device, date, commit and
the command that reproduces it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hybridpar.distributed.bandwidth import format_size

if TYPE_CHECKING:
    from matplotlib.figure import Figure

CONFIG_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:purple")  # TP g, DP g, TKNP g, TP 2 x TKNP g/2
CATEGORY_COLORS = {"gemm": "tab:blue", "attention": "tab:orange", "communication": "tab:red", "other": "tab:gray"}


def provenance(record: dict[str, Any]) -> str:
    """``"NVIDIA H200 (1 of nvidia-h200-x2), 2026-11-21, commit abc1234: python bench/bench_decode.py"``."""
    m = record["meta"]
    return f"{m['device']}, {m['date']}, commit {m['git_commit']}: `{m['command']}`"


def _subplots(ncols: int = 1, width: float = 6.5, height: float = 3.4):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), squeeze=False)
    return fig, list(axes[0])


def plot_allreduce(record: dict[str, Any]) -> Figure:
    """Bus bandwidth of raw NCCL vs hybridpar's all-reduces (left); small-message latency, eager vs graph (right)."""
    res = record["results"]
    fig, (ax, ax2) = _subplots(2, 10, 3.4)
    sweep = res["sweep"]
    sizes = [r["size_bytes"] for r in sweep]
    for key, label, style in (("raw", "raw dist.all_reduce", "o-"), ("layer", "TP layer (in place)", "s--"),
                              ("copy", "all_reduce (copy)", "x:")):
        ax.semilogx(sizes, [r[f"{key}_busbw"] / 1e9 for r in sweep], style, label=label, base=2)
    ticks = sizes[:: max(1, len(sizes) // 5)]
    ax.set_xticks(ticks, [format_size(s) for s in ticks])
    ax.set_xlabel("message size")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    lat = res.get("latency") or []
    if lat:
        lsizes = [r["size_bytes"] for r in lat]
        ax2.semilogx(lsizes, [r["eager_us"] for r in lat], "o-", label="eager launches", base=2)
        ax2.semilogx(lsizes, [r["graph_us"] for r in lat], "s-", label="CUDA graph replay", base=2)
        lt = lsizes[:: max(1, len(lsizes) // 4)]
        ax2.set_xticks(lt, [format_size(s) for s in lt])
        ax2.set_xlabel("message size")
        ax2.set_ylabel("time per all-reduce (us)")
        ax2.set_ylim(bottom=0)
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    else:
        ax2.set_visible(False)
    fig.tight_layout()
    return fig


def decode_rows(*records: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of several ``decode`` results files merged by ``(model, batch)`` (later files add modes),
    with the roofline of :func:`decode_roofline`."""
    merged: dict[tuple[str, int], dict[str, Any]] = {}
    for record in records:
        bandwidth = record["results"]["copy_bandwidth"]
        for r in record["results"]["rows"]:
            merged.setdefault((r["model"], r["batch"]), {}).update(decode_roofline(r, bandwidth))
    return list(merged.values())


def decode_roofline(row: dict[str, Any], bandwidth: float) -> dict[str, Any]:
    """``row`` with its roofline step recomputed from the bytes a decode step reads.

    The results files before December 2026 recorded every parameter byte as read; an untied input
    embedding is only looked up, one row per token (:func:`hybridpar.roofline.unread_embedding_params`),
    so its bytes come off ``weight_bytes`` here, and every ``*_roofline_frac`` follows. Later files
    record only the bytes read (``bench_decode.read_bytes``: not a whole number of bytes per
    parameter) and are returned as they are.
    """
    from hybridpar.roofline import MODEL_PRESETS, num_params, unread_embedding_params

    shape = MODEL_PRESETS.get(row["model"].removesuffix("-shape"))
    if shape is None:
        return dict(row)
    bytes_per_param = row["weight_bytes"] / num_params(shape)
    if bytes_per_param != round(bytes_per_param):  # already the bytes read
        return dict(row)
    read = row["weight_bytes"] - unread_embedding_params(shape) * bytes_per_param
    roof = (read + row["kv_bytes"]) / bandwidth
    out = {**row, "weight_bytes": read, "roofline_s": roof, "roofline_ms": f"{roof * 1e3:.3f}"}
    for key, value in row.items():
        if key.endswith("_roofline_frac"):
            out[key] = roof / row[key.removesuffix("_roofline_frac") + "_s"]
    return out


MODES = (("reference", "x:", "per-request eager (before)"), ("static", "s--", "batched static, eager"),
         ("graph", "o-", "CUDA graph"), ("graph_triton", "^-", "graph + Triton decode attention"),
         ("fused", "D-", "graph + Triton attention + fused kernels"))


def plot_decode_roofline(rows: list[dict[str, Any]], bandwidth: float, peak_flops: float = 989e12) -> Figure:
    """Left: the classic roofline (attained TFLOP/s against arithmetic intensity) with every measured
    step; right: step time against batch size per model, with the roofline step.

    A decode step does about ``2 * params * B`` FLOPs (attention's are under 2 % here) and moves
    ``weight bytes + KV bytes``; ``peak_flops`` is the datasheet's dense bf16 rate (a label only:
    no point comes near it)."""
    fig, (ax, ax2) = _subplots(2, 11, 4.0)
    intensities = [r["weight_bytes"] * r["batch"] / (r["weight_bytes"] + r["kv_bytes"]) for r in rows]
    lo, hi = min(intensities) / 2, peak_flops / bandwidth * 4
    xs = [lo * (hi / lo) ** (i / 60) for i in range(61)]
    ax.loglog(xs, [min(peak_flops, bandwidth * x) / 1e12 for x in xs], "k-", lw=2,
              label=f"roofline: {bandwidth / 1e12:.2f} TB/s copy, {peak_flops / 1e12:.0f} TFLOP/s")
    markers = {m: style[0] for m, style, _ in MODES}
    colors = {}
    for r, intensity in zip(rows, intensities):
        color = colors.setdefault(r["model"], f"C{len(colors)}")
        for mode, _, _ in MODES:
            if f"{mode}_s" in r:
                ax.loglog(intensity, r["weight_bytes"] * r["batch"] / r[f"{mode}_s"] / 1e12, markers[mode],
                          color=color, ms=6, mfc="none" if mode in ("reference", "static") else color)
    for model, color in colors.items():
        ax.plot([], [], "o", color=color, label=model)
    for mode, style, label in MODES:
        ax.plot([], [], style[0], color="gray", label=label)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("attained TFLOP/s")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left")
    for model, color in colors.items():
        mrows = sorted((r for r in rows if r["model"] == model), key=lambda r: r["batch"])
        batches = [r["batch"] for r in mrows]
        ax2.plot(batches, [r["roofline_s"] * 1e3 for r in mrows], "-", color=color, lw=3, alpha=0.35)
        for mode, style, _ in MODES:
            pts = [(r["batch"], r[f"{mode}_s"] * 1e3) for r in mrows if f"{mode}_s" in r]
            if pts:
                ax2.plot(*zip(*pts), style, color=color, ms=4)
        ax2.set_xscale("log", base=2)
        ax2.set_yscale("log")
        ax2.set_xticks(batches, [str(b) for b in batches])
    ax2.plot([], [], "-", color="gray", lw=3, alpha=0.35, label="HBM roofline step")
    for mode, style, label in MODES:
        ax2.plot([], [], style, color="gray", label=label)
    ax2.set_xlabel("batch size")
    ax2.set_ylabel("decode step (ms)")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_tp_scaling(record: dict[str, Any]) -> Figure:
    """Stacked GPU time per step by category, for each (TP, batch); the graph step time as a marker."""
    rows = record["results"]["rows"]
    fig, (ax,) = _subplots(1, 7, 3.6)
    labels = [f"TP{r['tp']}\nB={r['batch']}" for r in rows]
    xs = range(len(rows))
    bottom = [0.0] * len(rows)
    for cat, color in CATEGORY_COLORS.items():
        vals = [r.get(f"{cat}_s", 0.0) * 1e3 for r in rows]
        ax.bar(xs, vals, bottom=bottom, color=color, label=cat if cat != "communication" else "all-reduce")
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.plot(xs, [r["step_s"] * 1e3 for r in rows], "k_", markersize=22, mew=2, label="step (graph)")
    for x, r in zip(xs, rows):
        if r["tp"] > 1:
            ax.annotate(f"{r['speedup_vs_tp1']:.2f}x", (x, r["step_s"] * 1e3), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("ms per decode step")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    return fig


def plot_radix(record: dict[str, Any]) -> Figure:
    """Hit rate against its maximum (left) and throughput relative to the cache-off baseline (right)."""
    rows = record["results"]["rows"]
    fig, (ax, ax2) = _subplots(2, 10, 3.6)
    labels = [f"{r['workload']}\n{r['cache']} {r['policy']}\n{r['arrival']}" for r in rows]
    xs = list(range(len(rows)))
    ax.bar(xs, [r["hit_rate"] for r in rows], color="tab:blue", label="measured")
    ax.plot(xs, [r["max_hit_rate"] for r in rows], "k_", markersize=20, mew=2, label="theoretical maximum")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_ylabel("cache hit rate")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax2.bar(xs, [r["speedup"] for r in rows], color="tab:green")
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_xticks(xs, labels, fontsize=7)
    ax2.set_ylabel("throughput / cache off")
    for x, r in zip(xs, rows):
        ax2.annotate(f"{r['speedup']:.2f}x", (x, r["speedup"]), textcoords="offset points", xytext=(0, 3),
                     ha="center", fontsize=7)
    fig.tight_layout()
    return fig


def config_label(row: dict[str, Any], gpus: int = 2) -> str:
    """``TP2``, ``DP4``, ``TP2xTKNP2``...: the row's ``config`` (results files from 2 GPUs before it existed: strategy + 2)."""
    return row.get("config") or f"{row['strategy'].upper()}{gpus}"


def plot_tknp(record: dict[str, Any]) -> Figure:
    """Decode throughput against context for every configuration (TP g, DP g, TKNP g, TP 2 x TKNP g/2),
    one panel per batch size. Solid: eager (all); dashed: CUDA graphs (TP and DP); crosses: the cost model."""
    rows = record["results"]["rows"]
    batches = sorted({r["batch"] for r in rows})
    order = sorted(rows, key=lambda r: ("tp", "dp", "tknp").index(r["strategy"]))  # stable: TKNP g before TP 2 x TKNP
    labels = list(dict.fromkeys(config_label(r) for r in order))
    fig, axes = _subplots(len(batches), 5 * len(batches), 3.6)
    for ax, batch in zip(axes, batches):
        for label, color in zip(labels, CONFIG_COLORS):
            pts = sorted((r["context"], r) for r in rows if r["batch"] == batch and config_label(r) == label)
            if not pts:
                continue
            ctx = [c for c, _ in pts]
            ax.semilogx(ctx, [r["batch"] / r["eager_s"] for _, r in pts], "o-", color=color, label=f"{label} eager",
                        base=2)
            ax.semilogx(ctx, [r["batch"] / r["predicted_s"] for _, r in pts], "x", color=color, ms=8)
            g = [(c, r["batch"] / r["graph_s"]) for c, r in pts if r.get("graph_s")]
            if g:
                ax.semilogx(*zip(*g), "s--", color=color, alpha=0.7, label=f"{label} graph", base=2)
        ax.set_title(f"batch {batch} (x: cost model)", fontsize=10)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("tokens/s")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_step_ladder(rows: list[dict[str, Any]], model: str = "llama-7b-shape", batch: int = 1) -> Figure:
    """Chapter 7's opening figure: one decode step of ``model`` at ``batch``, the roofline's time and each
    way of running it, as bars of milliseconds labelled with their share of the roofline."""
    row = next(r for r in rows if r["model"] == model and r["batch"] == batch)
    fig, (ax,) = _subplots(1, 9, 2.6)
    bars = [("roofline: bytes / HBM bandwidth", row["roofline_s"], "black")]
    bars += [(label, row[f"{mode}_s"], f"C{i}") for i, (mode, _, label) in enumerate(MODES) if f"{mode}_s" in row]
    for i, (label, seconds, color) in enumerate(bars):
        ax.barh(i, seconds * 1e3, color=color, alpha=0.75)
        share = "" if i == 0 else f"  {row['roofline_s'] / seconds:.0%} of the roofline"
        ax.text(seconds * 1e3, i, f" {seconds * 1e3:.2f} ms{share}", va="center", fontsize=8)
    ax.set_yticks(range(len(bars)), [b[0] for b in bars], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms per decode step")
    ax.set_xlim(0, max(b[1] for b in bars) * 1e3 * 1.45)
    ax.set_title(f"one decode step, {model}, batch {batch}, context {row['context']}", fontsize=10)
    fig.tight_layout()
    return fig
