"""Offline throughput in nano-vllm's style: 256 requests, random lengths, every output token generated.

nano-vllm's ``bench.py``: ``--requests`` (256) requests whose prompt and output lengths are drawn
uniformly from ``[--min-len, --max-len]`` (100..1024, seed 0), random token ids, EOS ignored, all
submitted at once; the result is output tokens per second of wall time (one warm-up run of the whole
workload, then the median of ``--runs`` timed runs, with their min and max). Here they are served by
:class:`~hybridpar.radix.scheduler.TPScheduler` (continuous batching, chunked prefill, CUDA
graphs; the radix cache off, since random prompts share nothing) on a model shape with random
bf16 weights: ``qwen3-0.6b-shape`` (the model nano-vllm reports) and ``llama-7b-shape``.

Next to the measured rate stands a roofline estimate of the same workload (:func:`roofline`):
prefill at the GPU's peak bf16 FLOP rate, decode at the measured copy bandwidth, with every
request decoding from the first step (the best case: one weight read per step serves all of them)
and every step reading each live request's KV once. ``share = estimated time / measured time``.

    python bench/bench_throughput.py
    python bench/bench_throughput.py --cpu      # miniature: qwen3-tiny, 16 requests of 8..32 tokens
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from hybridpar import launch
from hybridpar.bench import ModelHandle, bench_env, build_model, copy_bandwidth, format_table, median, write_results
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel


def workload(num: int, lo: int, hi: int, vocab: int, seed: int = 0) -> list[tuple[list[int], int]]:
    """``num`` (prompt token ids, output length) pairs, lengths uniform in ``[lo, hi]`` (nano-vllm's draw)."""
    rng = random.Random(seed)
    prompts = [[rng.randint(0, vocab - 1) for _ in range(rng.randint(lo, hi))] for _ in range(num)]
    return [(p, rng.randint(lo, hi)) for p in prompts]


def roofline(reqs: list[tuple[list[int], int]], weight_bytes: int, kv_bytes_per_token: int, num_params: int,
             bandwidth: float, peak_flops: float) -> dict:
    """Seconds the workload needs at best: prefill FLOPs at peak, then decode steps at the memory roofline."""
    prefill_s = 2 * num_params * sum(len(p) for p, _ in reqs) / peak_flops
    steps = max(n for _, n in reqs)
    kv_read = sum(kv_bytes_per_token * (len(p) * n + n * (n + 1) // 2) for p, n in reqs)
    decode_s = (steps * weight_bytes + kv_read) / bandwidth
    return {"prefill_s": prefill_s, "decode_s": decode_s, "seconds": prefill_s + decode_s,
            "kv_bytes_read": kv_read, "decode_steps": steps}


def worker(models: list[str], dtype_name: str, reqs_spec: tuple[int, int, int], graphs: bool, copy_bytes: int,
           peak_flops: float, server: dict, runs: int = 3) -> list[dict]:
    from hybridpar.core import SamplingParams
    from hybridpar.radix.scheduler import TPScheduler

    initialize_tensor_parallel(1)
    device = current_device()
    bandwidth = copy_bandwidth(device, copy_bytes)
    rows = []
    for name in models:
        model = build_model(name, device, getattr(torch, dtype_name), get_tp_group())
        cfg = model.config
        reqs = workload(*reqs_spec, vocab=min(cfg.vocab_size, 32000))
        handle = ModelHandle(model, get_tp_group(), device,
                             server_kwargs=dict(use_cuda_graph=graphs, disable_radix_cache=True, **server))
        sched = TPScheduler(handle)  # one engine for every run, as a running server: pool and graphs persist
        walls = []
        for _ in range(runs + 1):  # the first run is the warm-up at the measured shapes (kernels, graphs)
            for prompt, n in reqs:
                sched.add_request(prompt, sampling=SamplingParams(max_new_tokens=n, ignore_eos=True))
            start = time.perf_counter()
            sched.process_requests()
            walls.append(time.perf_counter() - start)
        graph = sched.runner.graph_runner
        capture = graph.capture_seconds if graph is not None else 0.0  # all in the warm-up run
        m, wall = sched.metrics, median(walls[1:])
        params = sum(p.numel() for p in model.parameters())
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        kv_tok = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * torch.finfo(model.dtype).bits // 8
        roof = roofline(reqs, wbytes, kv_tok, params, bandwidth, peak_flops)
        out_tokens = sum(n for _, n in reqs)
        rows.append({"model": name, "requests": len(reqs), "input_tokens": sum(len(p) for p, _ in reqs),
                     "output_tokens": out_tokens, "generated_tokens": m.generated_tokens // (runs + 1), "wall_s": wall,
                     "graph_capture_s": capture, "output_tok_s": out_tokens / wall,
                     "wall_s_runs": walls[1:], "wall_s_min": min(walls[1:]), "wall_s_max": max(walls[1:]),
                     "decode_steps": m.decode_steps // (runs + 1), "prefill_steps": m.prefill_steps // (runs + 1),
                     "preemptions": m.preemptions,
                     "roofline_s": roof["seconds"], "roofline_tok_s": out_tokens / roof["seconds"],
                     "roofline_share": roof["seconds"] / wall, "roofline": roof, "copy_bandwidth": bandwidth,
                     "peak_flops": peak_flops})
        del model, handle, sched
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="miniature: qwen3-tiny, fp32, 16 requests of 8..32 tokens")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--min-len", type=int, default=100)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--max-running", type=int, default=256)
    p.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up run (median and min/max)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    args = p.parse_args(argv)
    server = dict(max_running_requests=args.max_running, chunked_prefill_size=8192, max_prefill_tokens=16384)
    if args.cpu:
        models, dtype, backend, copy_bytes = args.models or ["qwen3-tiny"], "float32", "gloo", 64 << 20
        spec, server = (min(args.requests, 16), 8, 32), dict(server, max_running_requests=16)
    else:
        if not torch.cuda.is_available():
            p.error("no GPU: use --cpu for the miniature")
        models, dtype, backend, copy_bytes = args.models or ["qwen3-0.6b-shape", "llama-7b-shape"], "bfloat16", "nccl", 4 << 30
        spec = (args.requests, args.min_len, args.max_len)
    rows = launch(worker, 1, models, dtype, spec, True, copy_bytes, args.peak_tflops * 1e12, server, args.runs,
                  backend=backend, timeout=1200)[0]
    print(f"{spec[0]} requests, input and output lengths uniform in {spec[1]}..{spec[2]}, ignore_eos, {dtype}")
    print(format_table(rows, [("model", "model", ""), ("output_tokens", "output tokens", ",d"), ("wall_s", "s (median)", ".2f"), ("wall_s_min", "min", ".2f"), ("wall_s_max", "max", ".2f"),
                              ("output_tok_s", "output tok/s", ",.0f"), ("roofline_tok_s", "roofline tok/s", ",.0f"),
                              ("roofline_share", "share", ".1%"), ("preemptions", "preempted", "d")]))
    res = {"requests": spec[0], "min_len": spec[1], "max_len": spec[2], "dtype": dtype, "server": server, "rows": rows}
    path = write_results("throughput", res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
