"""Demo: every tensor-parallel layer matches its unsharded reference.

Each rank builds the same unsharded torch modules from one seed, loads its shard of their
weights through the layers' ``weight_loader``, runs both on the same input and reports the
largest absolute difference between what the rank computed and the part of the reference
output it is responsible for. The parent prints what ran and what to look for, one table sorted by
rank, and a one-line verdict.

    python -m hybridpar.demos.tp_layers --tp 2 --backend auto
"""
from __future__ import annotations

import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hybridpar.config import ArgumentParser
from hybridpar.distributed.launcher import BACKENDS, current_device, launch
from hybridpar.distributed.parallel_state import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    initialize_tensor_parallel,
)
from hybridpar.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    valid_tp_sizes,
)

HIDDEN, FFN, VOCAB, HEADS, KV_HEADS = 64, 128, 1000, 8, 2
HEAD_SIZE = HIDDEN // HEADS
TOLERANCE = 1e-5  # relative to the largest reference value


def _load(layer: nn.Module, ref: nn.Module, *shard_id: Any) -> None:
    """Load the full reference weight (and bias) into ``layer`` through its weight loaders."""
    for name in ("weight", "bias"):
        param, full = getattr(layer, name, None), getattr(ref, name, None)
        if param is not None and full is not None:
            param.weight_loader(param, full.detach().cpu(), *shard_id)


def _compare(layer: str, shard: nn.Parameter, got: torch.Tensor, want: torch.Tensor) -> dict[str, Any]:
    diff = (got - want).abs().max().item()
    return {
        "layer": layer,
        "local weight": list(shard.shape),
        "max abs diff": diff,
        "ok": got.shape == want.shape and diff <= TOLERANCE * max(1.0, want.abs().max().item()),
    }


def _rank_report(seed: int) -> list[dict[str, Any]]:
    """Runs on every rank: compare each layer with its unsharded reference."""
    initialize_tensor_parallel(dist.get_world_size())
    tp = get_tensor_model_parallel_world_size()
    rank = get_tensor_model_parallel_rank()
    dev = current_device()
    torch.manual_seed(seed)  # same reference modules and inputs on every rank
    x = torch.randn(4, HIDDEN, device=dev)
    rows = []

    ref = nn.Linear(HIDDEN, FFN).to(dev)
    col = ColumnParallelLinear(HIDDEN, FFN, gather_output=True)
    _load(col, ref)
    rows.append(_compare("ColumnParallelLinear (gathered)", col.weight, col.to(dev)(x), ref(x)))

    ref = nn.Linear(FFN, HIDDEN).to(dev)
    row = RowParallelLinear(FFN, HIDDEN, input_is_parallel=False)
    _load(row, ref)
    h = torch.randn(4, FFN, device=dev)
    rows.append(_compare("RowParallelLinear (reduced)", row.weight, row.to(dev)(h), ref(h)))

    gate, up = nn.Linear(HIDDEN, FFN).to(dev), nn.Linear(HIDDEN, FFN).to(dev)
    merged = MergedColumnParallelLinear(HIDDEN, [FFN, FFN])
    _load(merged, gate, 0)
    _load(merged, up, 1)
    n = FFN // tp
    want = torch.cat([gate(x)[:, rank * n : (rank + 1) * n], up(x)[:, rank * n : (rank + 1) * n]], dim=-1)
    rows.append(_compare("MergedColumnParallelLinear (shard)", merged.weight, merged.to(dev)(x), want))

    refs = {s: nn.Linear(HIDDEN, (HEADS if s == "q" else KV_HEADS) * HEAD_SIZE).to(dev) for s in "qkv"}
    qkv = QKVParallelLinear(HIDDEN, HEAD_SIZE, HEADS, KV_HEADS)
    for s, r in refs.items():
        _load(qkv, r, s)
    q0, kv0 = rank * qkv.q_size, qkv.kv_head_start * HEAD_SIZE
    want = torch.cat([refs["q"](x)[:, q0 : q0 + qkv.q_size]]
                     + [refs[s](x)[:, kv0 : kv0 + qkv.kv_size] for s in "kv"], dim=-1)
    rows.append(_compare("QKVParallelLinear (shard)", qkv.weight, qkv.to(dev)(x), want))

    ref_emb = nn.Embedding(VOCAB, HIDDEN).to(dev)
    emb = VocabParallelEmbedding(VOCAB, HIDDEN)
    _load(emb, ref_emb)
    ids = torch.randint(0, VOCAB, (4, 16), device=dev)
    rows.append(_compare("VocabParallelEmbedding", emb.weight, emb.to(dev)(ids), ref_emb(ids)))

    head = ParallelLMHead(VOCAB, HIDDEN).tie_weights(emb)
    rows.append(_compare("ParallelLMHead (tied, gathered)", head.weight, head(x), x @ ref_emb.weight.T))
    return [{"rank": rank, **r} for r in rows]


def run_demo(tp_size: int = 2, backend: str = "auto", seed: int = 0) -> list[dict[str, Any]]:
    """Launch ``tp_size`` ranks; return one row per (rank, layer), sorted by rank.

    Each row: ``rank``, ``layer``, ``local weight`` (shape of the rank's shard), ``max abs diff``
    versus the unsharded layer, ``ok`` (within ``TOLERANCE``).
    """
    if tp_size not in valid_tp_sizes(HEADS, KV_HEADS):
        raise ValueError(
            f"tp_size={tp_size} cannot shard the demo's {HEADS} heads / {KV_HEADS} KV heads; "
            f"use one of {valid_tp_sizes(HEADS, KV_HEADS)}"
        )
    per_rank = launch(_rank_report, tp_size, seed, backend=backend)
    return sorted((row for rows in per_rank for row in rows), key=lambda r: r["rank"])


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'rank':>4}  {'layer':<36}{'local weight':<14}{'max abs diff':>13}  ok"
    lines = [header, "-" * len(header)]
    for r in rows:
        shape = "x".join(map(str, r["local weight"]))
        lines.append(f"{r['rank']:>4}  {r['layer']:<36}{shape:<14}{r['max abs diff']:>13.3g}  {'yes' if r['ok'] else 'NO'}")
    return "\n".join(lines)


def format_report(rows: list[dict[str, Any]], tp_size: int, backend: str) -> str:
    """What ran, what to look for, the table (:func:`format_table`) and a one-line verdict."""
    from hybridpar.demos.explain import intro, verdict

    ran = [f"the tensor-parallel layers of chapter 3 (column-, row-parallel, merged gate/up, QKV with {HEADS} query "
           f"/ {KV_HEADS} KV heads, vocabulary-parallel embedding of {VOCAB} rows, tied LM head) on {tp_size} ranks, "
           f"{backend}",
           "no model: random weights and inputs from one seed; the reference is the unsharded torch layer "
           "(nn.Linear, nn.Embedding) with the same weights"]
    look = ["local weight: the shard each rank holds, 1/tp of the output rows (column-parallel), of the input "
            "columns (row-parallel) or of the vocabulary",
            "max abs diff: the rank's output against its part of the reference; float rounding only"]
    layers = len({r["layer"] for r in rows})
    worst = max(r["max abs diff"] for r in rows)
    if all(r["ok"] for r in rows):
        end = (f"all {layers} layers match the unsharded reference on every rank (largest difference {worst:.1e}, "
               f"tolerance {TOLERANCE:g} of the largest value): each rank computes exactly its share.")
    else:
        bad = sorted({r["layer"] for r in rows if not r["ok"]})
        end = f"MISMATCH: {', '.join(bad)} differ from the unsharded reference."
    return "\n".join([intro("Tensor-parallel layers", ran, look), format_table(rows), verdict(end)])


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2, help="number of tensor-parallel ranks (default 2)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="gloo (CPU), nccl (GPU) or auto")
    args = parser.parse_args(argv)
    try:
        rows = run_demo(args.tp, args.backend)
    except ValueError as exc:  # bad --tp / --backend combination, found before spawning
        parser.error(str(exc))
    from hybridpar.distributed.launcher import resolve_backend

    backend = "gloo (CPU)" if resolve_backend(args.backend, args.tp) == "gloo" else "NCCL (GPU)"
    print(format_report(rows, args.tp, backend))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
