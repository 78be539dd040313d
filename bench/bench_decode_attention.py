"""Decode attention of one layer: torch_native (gather + SDPA) against the Triton paged kernel.

At the Llama-7B shape (32 query and 32 KV heads of 128, bf16) by default, for each batch size and
context, one layer's decode attention over a paged pool whose slots are scattered (a random
permutation, as after a radix cache has served for a while) is timed both ways (median of
``--iters`` CUDA-event samples after warm-up), with the bytes of KV it must read and the
bandwidth that implies. The Triton output is compared with the torch_native one (max |difference|).

    python bench/bench_decode_attention.py
    python bench/bench_decode_attention.py --heads 14 2 --head-dim 64     # the Qwen2.5-0.5B shape
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch

from hybridpar.bench import bench_env, format_table, median, time_fn, write_results
from hybridpar.models.decode_attention import decode_attention, length_mask


def measure(batch: int, context: int, hq: int, hkv: int, d: int, iters: int, device: torch.device) -> dict:
    from hybridpar.models.triton_decode import decode_attention_fwd, num_kv_splits_for

    gen = torch.Generator(device=device).manual_seed(batch * 7919 + context)
    n_slots = batch * context + 1
    k_pool = torch.randn(n_slots, hkv, d, device=device, dtype=torch.bfloat16, generator=gen)
    v_pool = torch.randn(n_slots, hkv, d, device=device, dtype=torch.bfloat16, generator=gen)
    q = torch.randn(batch, hq, d, device=device, dtype=torch.bfloat16, generator=gen)
    slots = (torch.randperm(n_slots - 1, device=device, generator=gen) + 1)[: batch * context].view(batch, context)
    lens = torch.full((batch,), context, device=device, dtype=torch.int64)
    scale = d ** -0.5
    mask = length_mask(lens, context)
    indptr = torch.arange(batch, device=device) * context
    splits = num_kv_splits_for(batch, hkv, context)

    def torch_native() -> torch.Tensor:
        return decode_attention(q, k_pool, v_pool, slots, mask, scale)

    def triton_kernel() -> torch.Tensor:
        return decode_attention_fwd(q, k_pool, v_pool, indptr, lens, slots.view(-1), scale, splits)

    err = (triton_kernel().float() - torch_native().float()).abs().max().item()
    kv_bytes = 2 * batch * context * hkv * d * 2
    row = {"batch": batch, "context": context, "num_kv_splits": splits, "kv_bytes": kv_bytes, "max_abs_err": err}
    for name, fn in (("torch_native", torch_native), ("triton", triton_kernel)):
        samples = time_fn(fn, device, iters=iters, warmup=5)  # both sides: the same warm-up and sample count
        t = median(samples)
        row[f"{name}_us"], row[f"{name}_gb_s"] = t * 1e6, kv_bytes / t / 1e9
        row[f"{name}_us_min"], row[f"{name}_us_max"] = min(samples) * 1e6, max(samples) * 1e6
    row["speedup"] = row["torch_native_us"] / row["triton_us"]
    return row


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    p.add_argument("--contexts", type=int, nargs="*", default=[256, 1024, 4096])
    p.add_argument("--heads", type=int, nargs=2, default=[32, 32], metavar=("HQ", "HKV"))
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU (the Triton kernel)")
    device = torch.device("cuda")
    rows = [measure(b, c, *args.heads, args.head_dim, args.iters, device) for b in args.batches for c in args.contexts]
    print(f"decode attention, one layer, Hq={args.heads[0]} Hkv={args.heads[1]} d={args.head_dim}, bf16, scattered slots")
    print(format_table(rows, [("batch", "B", "d"), ("context", "ctx", "d"), ("num_kv_splits", "splits", "d"),
                              ("torch_native_us", "torch_native us", ".1f"), ("triton_us", "triton us", ".1f"),
                              ("speedup", "x", ".2f"), ("triton_gb_s", "triton GB/s", ",.0f"),
                              ("max_abs_err", "max |err|", ".1e")]))
    res = {"heads": args.heads, "head_dim": args.head_dim, "dtype": "bfloat16", "rows": rows}
    path = write_results("decode_attention" + args.tag, res, bench_env(device))
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
