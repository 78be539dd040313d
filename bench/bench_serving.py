"""Online serving: latency and throughput of `hybridpar serve` under load, radix cache on and off.

In the style of SGLang's ``bench_serving``: requests are sent to the OpenAI-compatible server as
streamed completions (token-id prompts), either all at once (``--request-rate inf``) or with
Poisson arrivals at ``--request-rate`` requests/s, and each is timed from the moment it is sent:

* TTFT, time to first token: until the first event with tokens arrives (the server sends one per step
  that sampled tokens for the request, with the text that became certain, possibly none);
* TPOT, time per output token: (latency - TTFT) / (output tokens - 1);
* request throughput and output tokens/s over the whole run (first send to last token);
* prefix-cache hit rate: cached prompt tokens / prompt tokens, from the responses' ``usage``.

Two workloads: ``shared-prefix`` (G groups x P prompts, each a group's S-token system prompt + a
Q-token question; :class:`~hybridpar.radix.workload.SharedPrefixWorkload`) and ``random`` (the same
lengths with nothing shared). Every server configuration gets one unmeasured warm-up round of the
same workload shape (other token ids) before the measured runs; the measured run is repeated
``--runs`` times and the table gives the median and the spread of the median TTFT (every run is in the
JSON, with each measure's min and max).

    python bench/bench_serving.py --cpu                 # miniature: qwen2-tiny, 4 x 4 x 64 / 16 / 16, TP 2
    python bench/bench_serving.py                       # GPU: qwen2.5-0.5b-shape bf16, 16 x 16 x 1024 / 64 / 128
    python bench/bench_serving.py --base-url http://127.0.0.1:8000   # a server you started
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import httpx

from hybridpar.bench import bench_env, format_table, percentile, write_results
from hybridpar.radix.workload import SharedPrefixWorkload
from hybridpar.serving import start_server


async def _one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, usage = None, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk["choices"] and ttft is None:  # the first step's tokens (a shape model's text may be empty)
                ttft = time.perf_counter() - start
            usage = chunk.get("usage") or usage
    latency = time.perf_counter() - start
    n = usage["completion_tokens"]
    return {"ttft": ttft if ttft is not None else latency, "latency": latency, "output_tokens": n,
            "prompt_tokens": usage["prompt_tokens"], "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"],
            "tpot": (latency - (ttft or latency)) / (n - 1) if n > 1 else None, "end": time.perf_counter()}


async def run_load(url: str, model: str, prompts: list[list[int]], max_tokens: int, rate: float, seed: int) -> dict:
    """Send every prompt (Poisson arrivals at ``rate``/s, or all at once), return the run's summary."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=None)) as client:
        tasks, start = [], time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.ensure_future(_one(client, url, model, prompt, max_tokens)))
            if rate != float("inf"):
                await asyncio.sleep(rng.expovariate(rate))
        done = await asyncio.gather(*tasks)
    wall = max(d["end"] for d in done) - start
    ttft, tpot = [d["ttft"] for d in done], [d["tpot"] for d in done if d["tpot"] is not None]
    prompt_tokens = sum(d["prompt_tokens"] for d in done)
    return {"requests": len(done), "wall_s": wall, "request_throughput": len(done) / wall,
            "output_tokens_per_s": sum(d["output_tokens"] for d in done) / wall,
            "ttft_mean_ms": 1e3 * statistics.mean(ttft), "ttft_median_ms": 1e3 * statistics.median(ttft),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99),
            "tpot_mean_ms": 1e3 * statistics.mean(tpot) if tpot else None,
            "tpot_median_ms": 1e3 * statistics.median(tpot) if tpot else None,
            "tpot_p99_ms": 1e3 * percentile(tpot, 99) if tpot else None,
            "hit_rate": sum(d["cached_tokens"] for d in done) / prompt_tokens}


def workload_prompts(kind: str, g: int, p: int, s: int, q: int, vocab: int, seed: int) -> list[list[int]]:
    """Token-id prompts, shuffled: shared-prefix, or the same lengths with nothing shared (``random``)."""
    shape = (g, p, s, q) if kind == "shared-prefix" else (g * p, 1, 0, s + q)
    w = SharedPrefixWorkload(*shape, output_len=1, vocab_size=vocab, seed=seed)
    return [r.prompt_ids for r in w.requests(shuffle=True)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="miniature run on the CPU (qwen2-tiny, gloo)")
    ap.add_argument("--base-url", default=None, help="an existing server (else servers are started here)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--tensor-parallel-size", type=int, default=None)
    ap.add_argument("--shape", type=int, nargs=4, metavar=("G", "P", "S", "Q"), default=None)
    ap.add_argument("--output-len", type=int, default=None)
    ap.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s (inf: all at once)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-num-seqs", type=int, default=None, help="requests running at once (default: all of them)")
    ap.add_argument("--workloads", nargs="+", default=["shared-prefix", "random"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="serving", help="results file name (serving-<device>-<date>.json)")
    a = ap.parse_args(argv)
    model = a.model or ("qwen2-tiny" if a.cpu else "qwen2.5-0.5b-shape")
    dtype = a.dtype or ("auto" if a.cpu else "bf16")
    tp = a.tensor_parallel_size or (2 if a.cpu else 1)
    g, p, s, q = a.shape or ((4, 4, 64, 16) if a.cpu else (16, 16, 1024, 64))
    out_len = a.output_len or (16 if a.cpu else 128)
    vocab = 2000 if a.cpu else 32000
    name = f"hybridpar/{model}" if "/" not in model else model
    configs = [("on", {}), ("off", {"no_prefix_caching": True})] if a.base_url is None else [("server", None)]
    rows, records = [], []
    for cache, flags in configs:
        server = None if flags is None else start_server(name, tensor_parallel_size=tp, dtype=dtype,
                                                         max_model_len=s + q + out_len + 16,
                                                         max_num_seqs=a.max_num_seqs or g * p, **flags)
        url = a.base_url or server.url
        try:
            for kind in a.workloads:
                warm = workload_prompts(kind, g, p, s, q, vocab, a.seed + 1000)
                asyncio.run(run_load(url, name, warm, out_len, a.request_rate, a.seed))  # warm-up, not measured
                runs = [asyncio.run(run_load(url, name, workload_prompts(kind, g, p, s, q, vocab, a.seed + r),
                                             out_len, a.request_rate, a.seed + r)) for r in range(a.runs)]
                keys = [k for k in runs[0] if runs[0][k] is not None]
                summary = {k: statistics.median(r[k] for r in runs) for k in keys}
                spread = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in keys}
                rows.append({"workload": kind, "cache": cache, **summary,
                             "ttft_p50_range": "{:.0f}-{:.0f}".format(*spread["ttft_median_ms"])})
                records.append({"workload": kind, "cache": cache, "runs": runs, "median": summary, "spread": spread})
        finally:
            if server is not None:
                server.stop()
    ideal = SharedPrefixWorkload(g, p, s, q, 1).theoretical_hit_rate(16)
    print(f"{name} ({dtype}, TP {tp}): {g} x {p} x {s} / {q} / {out_len}, rate {a.request_rate}/s, "
          f"median of {a.runs} runs; best possible shared-prefix hit rate {ideal:.3f}")
    print(format_table(rows, [("workload", "workload", ""), ("cache", "cache", ""), ("request_throughput", "req/s", ".2f"),
                              ("output_tokens_per_s", "out tok/s", ".0f"), ("ttft_mean_ms", "TTFT mean", ".1f"),
                              ("ttft_median_ms", "TTFT p50", ".1f"), ("ttft_p50_range", "(min-max)", ""),
                              ("ttft_p99_ms", "TTFT p99", ".1f"),
                              ("tpot_mean_ms", "TPOT mean", ".2f"), ("tpot_median_ms", "TPOT p50", ".2f"),
                              ("tpot_p99_ms", "TPOT p99", ".2f"), ("hit_rate", "hit rate", ".3f")]))
    meta = bench_env("cpu" if a.cpu else None)
    meta.update(model=name, dtype=dtype, tensor_parallel_size=tp, shape=[g, p, s, q], output_len=out_len,
                max_num_seqs=a.max_num_seqs or g * p,
                request_rate=a.request_rate, runs=a.runs, ideal_hit_rate=ideal)
    print("wrote", write_results(a.name, records, meta))


if __name__ == "__main__":
    main()
