"""hybridpar versus transformers ``generate`` on the same model, weights, GPU and dtype.

For each model shape, one set of random bf16 weights is drawn on the GPU and loaded into both
hybridpar's decoder and transformers' model (``attn_implementation="sdpa"``). Every request has a
``--prompt``-token random prompt and generates exactly ``--new`` tokens (greedy; EOS ignored).
Tokens/s = generated tokens / wall time of the whole call (prefill included), after one warm-up.

* batch 1: ``transformers generate`` vs ``hybridpar generate(use_cuda_graph=True)``;
* batch ``--batch`` (32): ``transformers generate`` on the padded-free batch vs hybridpar's
  continuous-batching server (:class:`~hybridpar.radix.scheduler.TPScheduler`, CUDA graphs on),
  and, for reference, ``hybridpar generate`` on the same batch.

    python bench/bench_vs_transformers.py
    python bench/bench_vs_transformers.py --cpu          # miniature: tiny models, fp32
"""
from __future__ import annotations

import argparse
import sys
import time
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
    synchronize,
    write_results,
)
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.parallel_state import get_tp_group, initialize_tensor_parallel


def _timed(fn, device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


def worker(models: list[str], batch: int, prompt_len: int, new_tokens: int, dtype_name: str, graphs: bool,
           compile_ops: bool = False, skip_hf: bool = False) -> list:
    from hybridpar.models.generate import generate
    from hybridpar.core import SamplingParams
    from hybridpar.radix.scheduler import TPScheduler

    initialize_tensor_parallel(1)
    device = current_device()
    dtype = getattr(torch, dtype_name)
    rows = []
    for name in models:
        tensors = random_checkpoint(name, device, dtype)
        model = build_model(name, device, dtype, get_tp_group(), tensors=tensors)
        hf = None if skip_hf else build_hf_model(name, tensors, device, dtype, "sdpa")
        del tensors
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, min(vocab, 30000), (batch, prompt_len), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

        def hf_generate(b: int, n: int = new_tokens) -> list:
            ids = torch.tensor(prompts[:b], device=device)
            with torch.no_grad():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
            return out[:, prompt_len:].tolist()

        def hp_generate(b: int, n: int = new_tokens) -> list:
            p = SamplingParams(max_new_tokens=n, ignore_eos=True)
            return [o.token_ids for o in generate(model, prompts[:b], p, use_cuda_graph=graphs)]

        handle = ModelHandle(model, get_tp_group(), device,
                             server_kwargs=dict(use_cuda_graph=graphs, max_running_requests=max(batch, 8),
                                                max_total_tokens=batch * (prompt_len + new_tokens) + 1024,
                                                chunked_prefill_size=None, max_prefill_tokens=batch * prompt_len,
                                                disable_radix_cache=True))

        servers: dict[int, TPScheduler] = {}

        def hp_serve(b: int, n: int = new_tokens) -> list:
            # one server per batch size, kept across calls like a running server: its KV pool and
            # captured graphs persist, so the timed call excludes the one-time capture
            sched = servers.setdefault(b, TPScheduler(handle))
            for pr in prompts[:b]:
                sched.add_request(pr, sampling=SamplingParams(max_new_tokens=n, ignore_eos=True))
            return [r.output_ids for r in sched.process_requests().values()]

        runs = [(1, "transformers", hf_generate), (1, "hybridpar generate", hp_generate),
                (batch, "transformers", hf_generate), (batch, "hybridpar generate", hp_generate),
                (batch, "hybridpar server", hp_serve)]
        if skip_hf:
            runs = [r for r in runs if r[1] != "transformers"]
        if compile_ops:
            from hybridpar.models.fused_ops import enable_compiled_ops

            enable_compiled_ops()  # hybridpar's modules only; transformers' model is unaffected
        for b, label, fn in runs:
            try:
                fn(b, 4)  # warm-up: kernels, cuBLAS, graph capture of the small buckets
                if label != "transformers":
                    fn(b)  # hybridpar: a full-length warm-up captures every (batch, length) bucket the run meets
                seconds = _timed(lambda: fn(b), device)
            except Exception as exc:  # report and go on
                rows.append({"model": name, "batch": b, "engine": label, "error": f"{type(exc).__name__}: {exc}"[:500]})
                continue
            rows.append({"model": name, "batch": b, "engine": label, "seconds": seconds,
                         "tok_s": b * new_tokens / seconds, "step_ms": seconds / new_tokens * 1e3})
        try:
            if skip_hf:
                raise RuntimeError("transformers runs skipped (--hf-from)")
            hf_tokens, hp_tokens = hf_generate(1, 16), hp_generate(1, 16)
            rows.append({"model": name, "batch": 1, "engine": "greedy agreement (first 16 tokens)",
                         "agree": sum(a == b for a, b in zip(hf_tokens[0], hp_tokens[0])) / 16})
        except Exception as exc:
            rows.append({"model": name, "engine": "agreement", "error": f"{type(exc).__name__}: {exc}"[:500]})
        del model, hf, handle
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    """hybridpar tokens/s over transformers' at the same model and batch."""
    out = []
    base = {(r["model"], r["batch"]): r["tok_s"] for r in rows if r.get("engine") == "transformers"}
    for r in rows:
        if r.get("engine", "").startswith("hybridpar") and (r["model"], r["batch"]) in base:
            out.append({"model": r["model"], "batch": r["batch"], "engine": r["engine"],
                        "speedup": r["tok_s"] / base[(r["model"], r["batch"])]})
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu", action="store_true", help="miniature: qwen2-tiny, llama-tiny, fp32, CPU")
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--compile", action="store_true",
                   help="hybridpar with RMSNorm/RoPE/SwiGLU fused by torch.compile (hybridpar.models.fused_ops)")
    p.add_argument("--hf-from", default=None, help="reuse the transformers rows of an earlier results file "
                   "(same recipes, weights, GPU and settings) instead of rerunning them")
    args = p.parse_args(argv)
    if args.cpu:
        models = args.models or ["qwen2-tiny", "llama-tiny"]
        batch, prompt, new, dtype, backend = min(args.batch, 2), min(args.prompt, 8), min(args.new, 8), "float32", "gloo"
    else:
        if not torch.cuda.is_available():
            p.error("no GPU: use --cpu for the miniature")
        models = args.models or ["qwen2.5-0.5b-shape", "llama-7b-shape"]
        batch, prompt, new, dtype, backend = args.batch, args.prompt, args.new, "bfloat16", "nccl"
    compile_ops = args.compile and not args.cpu
    rows = launch(worker, 1, models, batch, prompt, new, dtype, True, compile_ops, args.hf_from is not None,
                  backend=backend, timeout=1200)[0]
    if args.hf_from:
        import json

        earlier = json.loads(Path(args.hf_from).read_text())
        rows = [r for r in rows if "error" not in r or r.get("engine") != "agreement"]
        rows += [dict(r, reused_from=args.hf_from) for r in earlier["results"]["rows"]
                 if r.get("engine") == "transformers" or "agree" in r]
    timed = [r for r in rows if "tok_s" in r]
    print(f"generate: {prompt}-token prompts, {new} new tokens, {dtype}")
    print(format_table(timed, [("model", "model", ""), ("batch", "B", "d"), ("engine", "engine", ""),
                               ("tok_s", "tok/s", ".1f"), ("step_ms", "ms/token step", ".2f")]))
    sp = speedups(timed)
    print(format_table(sp, [("model", "model", ""), ("batch", "B", "d"), ("engine", "engine", ""),
                            ("speedup", "x transformers", ".1f")]))
    for r in rows:
        if "error" in r:
            print(f"ERROR {r['model']} {r.get('batch')} {r['engine']}: {r['error']}")
        if "agree" in r:
            print(f"{r['model']}: greedy tokens equal to transformers' for {r['agree']:.0%} of the first 16")
    res = {"prompt_len": prompt, "new_tokens": new, "dtype": dtype, "compiled_ops": compile_ops, "rows": rows,
           "speedups": sp}
    path = write_results("vs_transformers" + ("_compiled" if compile_ops else ""), res, bench_env("cpu" if args.cpu else None))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
