"""hybridpar versus transformers ``generate`` on the same model, weights, GPU and dtype, warmed alike.

For each model shape, one set of random bf16 weights is drawn on the GPU and loaded into both
hybridpar's decoder and transformers' model (``attn_implementation="sdpa"``). Every request has a
``--prompt``-token random prompt and generates exactly ``--new`` tokens (greedy; EOS ignored).
Tokens/s = generated tokens / wall time of the whole call (prefill included).

Fairness (:func:`hybridpar.bench.time_sides`): at each batch size every side gets the same
``--warmup`` full-length calls at the measured shape, then ``--runs`` timed calls that take turns;
each row reports the median and the spread (min, max). transformers runs in two set-ups:

* ``transformers``: its default ``generate`` (dynamic cache, eager forward);
* ``transformers static+compile``: ``cache_implementation="static"``, with which ``generate``
  compiles the decoding forward on a GPU (its documented fastest set-up; on the CPU it stays eager).

hybridpar runs ``generate(use_cuda_graph=True)`` and, at batch ``--batch`` (32), also its
continuous-batching server (:class:`~hybridpar.radix.scheduler.TPScheduler`, CUDA graphs on), both
with their GPU defaults: Triton decode attention and fused element-wise kernels.

    python bench/bench_vs_transformers.py
    python bench/bench_vs_transformers.py --cpu          # miniature: tiny models, fp32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from hybridpar import launch
from hybridpar.bench import (
    ModelHandle,
    bench_env,
    build_hf_model,
    build_model,
    format_table,
    random_checkpoint,
    time_sides,
    write_results,
)
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel


HF_SIDES = {"transformers": {}, "transformers static+compile": {"cache_implementation": "static"}}


def worker(models: list[str], batch: int, prompt_len: int, new_tokens: int, dtype_name: str, graphs: bool,
           warmup: int = 2, runs: int = 3) -> list:
    from hybridpar.core import SamplingParams
    from hybridpar.models.generate import generate
    from hybridpar.radix.scheduler import TPScheduler

    initialize_tensor_parallel(1)
    device = current_device()
    dtype = getattr(torch, dtype_name)
    rows = []
    for name in models:
        tensors = random_checkpoint(name, device, dtype)
        model = build_model(name, device, dtype, get_tp_group(), tensors=tensors)
        hf = build_hf_model(name, tensors, device, dtype, "sdpa")
        del tensors
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, min(vocab, 30000), (batch, prompt_len), generator=gen).tolist()

        def hf_generate(b: int, n: int = new_tokens, **kwargs) -> list:
            ids = torch.tensor(prompts[:b], device=device)
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)
            return out[:, prompt_len:].tolist()

        def hp_generate(b: int, n: int = new_tokens) -> list:
            p = SamplingParams(max_new_tokens=n, ignore_eos=True)
            return [o.token_ids for o in generate(model, prompts[:b], p, use_cuda_graph=graphs)]

        handle = ModelHandle(model, get_tp_group(), device,
                             server_kwargs=dict(use_cuda_graph=graphs, max_running_requests=max(batch, 8),
                                                max_total_tokens=batch * (prompt_len + new_tokens) + 1024,
                                                chunked_prefill_size=None, max_prefill_tokens=batch * prompt_len,
                                                disable_radix_cache=True))

        def hp_serve(b: int, n: int = new_tokens) -> list:
            # one server per batch size, kept across calls like a running server: its KV pool and
            # captured graphs persist from the warm-up calls
            sched = servers.setdefault(b, TPScheduler(handle))
            for pr in prompts[:b]:
                sched.add_request(pr, sampling=SamplingParams(max_new_tokens=n, ignore_eos=True))
            return [r.output_ids for r in sched.process_requests().values()]

        servers: dict[int, TPScheduler] = {}
        for b in sorted({1, batch}):
            sides = {label: (lambda b=b, kw=kw: hf_generate(b, **kw)) for label, kw in HF_SIDES.items()}
            sides["hybridpar generate"] = lambda b=b: hp_generate(b)
            if b > 1:
                sides["hybridpar server"] = lambda b=b: hp_serve(b)
            for label, t in time_sides(sides, device, warmup=warmup, runs=runs).items():
                row = {"model": name, "batch": b, "engine": label, "warmups": t.warmups, "runs": len(t.samples)}
                if t.error is not None:
                    row["error"] = t.error
                else:
                    lo, hi = t.spread
                    row.update(seconds=t.median, min_s=lo, max_s=hi, tok_s=b * new_tokens / t.median,
                               step_ms=t.median / new_tokens * 1e3, step_ms_min=lo / new_tokens * 1e3,
                               step_ms_max=hi / new_tokens * 1e3)
                rows.append(row)
        try:
            hf_tokens, hp_tokens = hf_generate(1, 16), hp_generate(1, 16)
            rows.append({"model": name, "batch": 1, "engine": "greedy agreement (first 16 tokens)",
                         "agree": sum(a == b for a, b in zip(hf_tokens[0], hp_tokens[0])) / 16})
        except Exception as exc:
            rows.append({"model": name, "engine": "agreement", "error": f"{type(exc).__name__}: {exc}"[:500]})
        del model, hf, handle, servers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    """hybridpar tokens/s (median) over each transformers set-up's at the same model and batch."""
    out = []
    for base_label in HF_SIDES:
        base = {(r["model"], r["batch"]): r["tok_s"] for r in rows if r.get("engine") == base_label and "tok_s" in r}
        for r in rows:
            if r.get("engine", "").startswith("hybridpar") and "tok_s" in r and (r["model"], r["batch"]) in base:
                out.append({"model": r["model"], "batch": r["batch"], "engine": r["engine"], "versus": base_label,
                            "speedup": r["tok_s"] / base[(r["model"], r["batch"])]})
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="miniature: qwen2-tiny, llama-tiny, fp32, CPU")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="full-length warm-up calls per side (the same for every side)")
    p.add_argument("--runs", type=int, default=3, help="timed calls per side; rows report the median and min/max")
    args = p.parse_args(argv)
    if args.cpu:
        models = args.models or ["qwen2-tiny", "llama-tiny"]
        batch, prompt, new, dtype, backend = min(args.batch, 2), min(args.prompt, 8), min(args.new, 8), "float32", "gloo"
    else:
        if not torch.cuda.is_available():
            p.error("no GPU: use --cpu for the miniature")
        models = args.models or ["qwen2.5-0.5b-shape", "llama-7b-shape"]
        batch, prompt, new, dtype, backend = args.batch, args.prompt, args.new, "bfloat16", "nccl"
    rows = launch(worker, 1, models, batch, prompt, new, dtype, True, args.warmup, args.runs,
                  backend=backend, timeout=1200)[0]
    timed = [r for r in rows if "tok_s" in r]
    print(f"generate: {prompt}-token prompts, {new} new tokens, {dtype}; "
          f"every side {args.warmup} warm-up calls, median of {args.runs} runs")
    print(format_table(timed, [("model", "model", ""), ("batch", "B", "d"), ("engine", "engine", ""),
                               ("tok_s", "tok/s", ".1f"), ("step_ms", "ms/token", ".2f"),
                               ("step_ms_min", "min", ".2f"), ("step_ms_max", "max", ".2f")]))
    sp = speedups(timed)
    print(format_table(sp, [("model", "model", ""), ("batch", "B", "d"), ("engine", "engine", ""),
                            ("versus", "versus", ""), ("speedup", "x", ".2f")]))
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['model']} {r.get('batch')} {r['engine']}: {r['error']}")
        if "agree" in r:
            print(f"{r['model']}: greedy tokens equal to transformers' for {r['agree']:.0%} of the first 16")
    res = {"prompt_len": prompt, "new_tokens": new, "dtype": dtype,
           "warmup": args.warmup, "runs": args.runs, "rows": rows, "speedups": sp}
    path = write_results("vs_transformers", res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
