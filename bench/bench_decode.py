"""Decode-step latency on one GPU against the HBM roofline, for batch 1 .. 128.

For each model shape (random bf16 weights drawn on the GPU) and batch size ``B``, every request
has about ``--context`` tokens of KV (random values: timing does not depend on them) and the step
adds one token to each. The ways to run the same step, each timed as the median of ``--iters``
steps with CUDA events after the same three untimed steps at the measured shape (a graph is
captured in them), the host's work included (input preparation, greedy argmax, copying the
``B`` token ids back), with the fastest and slowest step beside the median:

* ``reference``: the model's forward over :class:`~hybridpar.models.attention_backend.ContiguousKVCache`
  (what ``generate`` did before the fast path; kernels launched one by one from Python);
* ``static``: the batched static decode path of :mod:`hybridpar.models.cuda_graph`, eager;
* ``graph``: the same, replayed from a CUDA graph, with PyTorch's element-wise ops and gather + SDPA
  decode attention (``attention_backend="torch_native"``);
* ``graph_triton``: the graph with the Triton paged-decode attention (:mod:`hybridpar.models.triton_decode`),
  which reads the KV in place;
* ``fused``: ``graph_triton`` with RMSNorm (+ residual add), RoPE and SwiGLU as one Triton kernel
  each (:mod:`hybridpar.models.triton_ops`): the default on a GPU.

The graph modes run as a decoding loop does: each step's own greedy tokens are its next inputs and
the lengths grow by one, so a steady step copies nothing to the device (:class:`~hybridpar.models.cuda_graph.DecodeGraphRunner`);
the lengths restart every ``WINDOW`` steps, which then load the batch again.

The roofline step reads every weight once (an untied input embedding only one row per token, so
its table is left out) and every request's KV once:
``T_roof = (weight bytes read + B * S * KV bytes per token) / bandwidth`` for the mean context ``S``
of the timed steps, with the bandwidth measured here by a device-to-device copy. ``fraction = t_roof / t``.

    python bench/bench_decode.py                          # GPU: qwen2.5-0.5b-shape, llama-7b-shape
    python bench/bench_decode.py --cpu                    # miniature: tiny models, fp32, CPU
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from hybridpar import launch
from hybridpar.bench import bench_env, build_model, copy_bandwidth, format_table, median, time_fn, write_results
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel
from hybridpar.radix.mem_pool import kv_bytes_per_token as pool_kv_bytes_per_token

WINDOW = 16  # timed steps run at contexts context-15 .. context (the roofline takes context - 7.5)


def param_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters (a tied embedding counted once)."""
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def read_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters a decode step reads: all of them (a tied embedding once, as the LM head),
    except an untied input embedding, of which a step looks up one row per token."""
    params = {id(p): p for p in model.parameters()}
    embedding = model.model.embed_tokens.weight
    if embedding is not model.lm_head.weight:
        params.pop(id(embedding))
    return sum(p.numel() * p.element_size() for p in params.values())


def kv_bytes_per_token(model) -> int:
    """KV bytes per token on this rank (the pools' formula, :func:`hybridpar.radix.mem_pool.kv_bytes_per_token`)."""
    c = model.config
    return pool_kv_bytes_per_token(c.num_layers, model.num_kv_heads_per_rank, c.head_dim, model.dtype)


def fill_random_(buffers: list[torch.Tensor]) -> None:
    for b in buffers:
        b.normal_()


def decode_step_fns(model, batch: int, context: int, modes: list[str]) -> dict:
    """One callable per mode running a decode step of ``batch`` requests at about ``context`` tokens."""
    from hybridpar.models.attention_backend import ForwardBatch
    from hybridpar.models.cuda_graph import ContiguousDecodeRunner
    from hybridpar.models.fused_ops import fused_ops_disabled

    device = model.lm_head.weight.device
    ids = torch.randint(0, model.config.vocab_size, (batch,), device=device)
    fns = {}
    keep = []
    if "reference" in modes:
        cache = model.make_kv_cache(batch, context)
        fill_random_(cache.k_buffer + cache.v_buffer)
        rows = cache.alloc(batch)

        def reference(cache=cache, rows=rows) -> list[int]:
            with fused_ops_disabled():
                fb = ForwardBatch.build(cache, rows, [context - 1] * batch, [1] * batch, device)
                logits = model.compute_logits(model(ids, fb.positions, fb))
                return logits.argmax(-1).tolist()

        fns["reference"] = reference
        keep.append(cache)
    for mode in ("static", "graph", "graph_triton", "fused"):
        if mode not in modes:
            continue
        runner = ContiguousDecodeRunner(model, batch, context, use_cuda_graph=(mode != "static"),
                                        attention_backend="torch_native" if mode in ("static", "graph") else "triton")
        fill_random_(runner.cache.k_buffer + runner.cache.v_buffer)
        state = {"rows": runner.cache.alloc(batch), "lens": [context] * batch, "ids": ids.tolist()}

        def step(runner=runner, state=state, fused=mode == "fused") -> list[int]:
            # a decode loop: lengths grow by one and the step's own tokens come back as inputs (so steady
            # steps copy nothing to the device), restarting every WINDOW steps below the cache's end
            lens = [n + 1 for n in state["lens"]] if state["lens"][0] < context else [context - WINDOW + 1] * batch
            with contextlib.nullcontext() if fused else fused_ops_disabled():
                runner.decode(state["rows"], lens, state["ids"])
            state["lens"], state["ids"] = lens, runner.runner.greedy_tokens()
            return state["ids"]

        fns[mode] = step
        keep.append(runner)
    return fns, keep


def worker(models: list[str], batches: list[int], context: int, iters: int, modes: list[str], dtype_name: str,
           copy_bytes: int) -> dict:
    initialize_tensor_parallel(1)
    device = current_device()
    dtype = getattr(torch, dtype_name)
    bandwidth = copy_bandwidth(device, copy_bytes)
    rows = []
    for name in models:
        model = build_model(name, device, dtype, get_tp_group())
        wbytes, kv_tok = read_bytes(model), kv_bytes_per_token(model)
        for batch in batches:
            fns, keep = decode_step_fns(model, batch, context, modes)
            kv = int(batch * (context - (WINDOW - 1) / 2) * kv_tok)
            roof = (wbytes + kv) / bandwidth
            row = {"model": name, "batch": batch, "context": context, "weight_bytes": wbytes, "kv_bytes": kv,
                   "roofline_s": roof}
            with torch.no_grad():
                for mode, fn in fns.items():
                    try:
                        samples = time_fn(fn, device, iters=iters, warmup=3)
                    except Exception as exc:  # report and go on with the other modes
                        row[f"{mode}_error"] = f"{type(exc).__name__}: {exc}"[:500]
                        continue
                    t = median(samples)
                    row[f"{mode}_s"], row[f"{mode}_min_s"], row[f"{mode}_max_s"] = t, min(samples), max(samples)
                    row[f"{mode}_tok_s"] = batch / t
                    row[f"{mode}_roofline_frac"] = roof / t
            rows.append(row)
            del fns, keep
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"copy_bandwidth": bandwidth, "context": context, "dtype": dtype_name, "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="miniature: qwen2-tiny and llama-tiny, fp32, gloo, CPU")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--batches", type=int, nargs="*", default=[1, 8, 32, 128])
    p.add_argument("--context", type=int, default=256, help="KV tokens per request after the step")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--modes", nargs="*", default=["reference", "static", "graph", "graph_triton", "fused"])
    p.add_argument("--tag", default="", help="suffix of the results name (decode<tag>)")
    args = p.parse_args(argv)
    if args.cpu:
        models = args.models or ["qwen2-tiny", "llama-tiny"]
        batches, context, iters, dtype, backend = [1, 8], min(args.context, 64), 5, "float32", "gloo"
        modes, copy_bytes = [m for m in args.modes if m in ("reference", "static")], 64 << 20
    else:
        if not torch.cuda.is_available():
            p.error("no GPU: use --cpu for the miniature")
        models = args.models or ["qwen2.5-0.5b-shape", "llama-7b-shape"]
        batches, context, iters, dtype, backend = args.batches, args.context, args.iters, "bfloat16", "nccl"
        modes, copy_bytes = args.modes, 4 << 30
    res = launch(worker, 1, models, batches, context, iters, modes, dtype, copy_bytes, backend=backend,
                 timeout=1200)[0]
    print(f"decode step, context {context}, {dtype}; copy bandwidth {res['copy_bandwidth'] / 1e12:.2f} TB/s")
    for r in res["rows"]:
        r["roofline_ms"] = f"{r['roofline_s'] * 1e3:.3f}"
        for m in modes:
            r[f"{m}_ms"] = r[f"{m}_s"] * 1e3 if f"{m}_s" in r else None
            r[f"{m}_spread"] = f"{r[f'{m}_min_s'] * 1e3:.3f}..{r[f'{m}_max_s'] * 1e3:.3f}" if f"{m}_s" in r else None
    cols = [("model", "model", ""), ("batch", "B", "d"), ("roofline_ms", "roof ms", "")]
    for m in modes:
        cols += [(f"{m}_ms", f"{m} ms", ".3f"), (f"{m}_spread", "min..max", ""), (f"{m}_roofline_frac", "of roof", ".2f")]
    print(format_table(res["rows"], cols))
    path = write_results("decode" + args.tag, res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
