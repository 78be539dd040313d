"""Demo: a tensor-parallel MLP block and attention block each cost one all-reduce forward, one backward.

Each rank builds the same unsharded reference modules from one seed, loads its shard of them into
tensor-parallel layers, runs each block forward and backward while counting the
``torch.distributed`` collectives it calls, and compares output and input gradient with the
reference. A third block gathers the MLP's hidden activations between the two matmuls, the naive
way, to show what the column -> row pairing saves. The parent prints what ran and what to look for,
one table sorted by rank, and a one-line verdict.

    python -m hybridpar.demos.tp_block --tp 2
"""
from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hybridpar.config import ArgumentParser
from hybridpar.distributed.launcher import BACKENDS, current_device, launch
from hybridpar.distributed.parallel_state import get_tensor_model_parallel_rank, initialize_tensor_parallel
from hybridpar.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    divide,
    validate_tp_size,
)
from hybridpar.roofline import MODEL_PRESETS

MODEL = MODEL_PRESETS["tiny"]  # qwen2-tiny's shape: hidden 256, intermediate 512, 8 query heads sharing 4 KV heads
TOKENS = 6
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
               "scatter", "gather")


@contextmanager
def patch_collectives(on_call: Callable[[str, tuple], None]) -> Iterator[None]:
    """Call ``on_call(name, args)`` before every :data:`COLLECTIVES` call of ``torch.distributed`` inside
    the ``with`` block (this process only); the originals are restored on exit."""
    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name: str, call: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            on_call(name, args)
            return call(*args, **kwargs)
        return wrapper

    for name, call in originals.items():
        setattr(dist, name, wrap(name, call))
    try:
        yield
    finally:
        for name, call in originals.items():
            setattr(dist, name, call)


@contextmanager
def count_collectives() -> Iterator[Counter[str]]:
    """Count this process's calls to ``torch.distributed`` collectives inside the ``with`` block."""
    counts: Counter[str] = Counter()
    with patch_collectives(lambda name, args: counts.update([name])):
        yield counts


def mlp_block(x: torch.Tensor, gate_up: MergedColumnParallelLinear, down: RowParallelLinear) -> torch.Tensor:
    """SwiGLU MLP: column-parallel gate/up, the activation on this rank's slice, row-parallel down."""
    gate, up = gate_up(x).chunk(2, dim=-1)  # this rank's slice of the intermediate features: no communication
    return down(F.silu(gate) * up)  # partial sums, all-reduced inside RowParallelLinear (g)


def attention_block(x: torch.Tensor, qkv: QKVParallelLinear, o_proj: RowParallelLinear) -> torch.Tensor:
    """Causal self-attention of ``x`` ([tokens, hidden]) over this rank's heads, then the row-parallel output."""
    t, d = x.shape[0], qkv.head_size
    q, k, v = qkv(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
    q = q.view(t, qkv.num_heads, d).transpose(0, 1)  # [local heads, tokens, head_dim]
    group = qkv.num_heads // qkv.num_kv_heads  # local query heads per local KV head
    k = k.view(t, qkv.num_kv_heads, d).transpose(0, 1).repeat_interleave(group, dim=0)
    v = v.view(t, qkv.num_kv_heads, d).transpose(0, 1).repeat_interleave(group, dim=0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # heads are independent: no communication
    return o_proj(out.transpose(0, 1).reshape(t, qkv.num_heads * d))


def _reference_attention(x: torch.Tensor, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear) -> torch.Tensor:
    t, d, heads, kv_heads = x.shape[0], MODEL.head_dim, MODEL.num_heads, MODEL.num_kv_heads
    qh = q(x).view(t, heads, d).transpose(0, 1)
    kh = k(x).view(t, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)
    vh = v(x).view(t, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, dim=0)
    return o(F.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(0, 1).reshape(t, heads * d))


def _run(block: Any, reference: Any, x: torch.Tensor) -> dict[str, Any]:
    """Forward and backward of ``block`` (counted) and of ``reference``; compare outputs and input gradients."""
    x_tp, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    with count_collectives() as forward:
        y = block(x_tp)
    with count_collectives() as backward:
        y.square().sum().backward()
    y_ref = reference(x_ref)
    y_ref.square().sum().backward()
    return {
        "forward": dict(forward),
        "backward": dict(backward),
        "output ok": torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5),
        "input grad ok": torch.allclose(x_tp.grad, x_ref.grad, rtol=1e-4, atol=1e-5),
    }


def _block_worker(seed: int) -> list[dict[str, Any]]:
    """Runs on every rank: the three blocks against their references."""
    initialize_tensor_parallel(dist.get_world_size())
    rank, dev = get_tensor_model_parallel_rank(), current_device()
    torch.manual_seed(seed)  # the same references and input on every rank
    h, f, d = MODEL.hidden_size, MODEL.intermediate_size, MODEL.head_dim
    gate, up, down = nn.Linear(h, f, bias=False), nn.Linear(h, f, bias=False), nn.Linear(f, h, bias=False)
    q, k, v = (nn.Linear(h, n * d, bias=False) for n in (MODEL.num_heads, MODEL.num_kv_heads, MODEL.num_kv_heads))
    o = nn.Linear(MODEL.num_heads * d, h, bias=False)
    x = torch.randn(TOKENS, h)

    gate_up = MergedColumnParallelLinear(h, [f, f], bias=False)
    gate_up_gathered = MergedColumnParallelLinear(h, [f, f], bias=False, gather_output=True)
    for i, part in enumerate((gate, up)):
        gate_up.weight.weight_loader(gate_up.weight, part.weight.detach(), i)
        gate_up_gathered.weight.weight_loader(gate_up_gathered.weight, part.weight.detach(), i)
    down_tp = RowParallelLinear(f, h, bias=False)
    down_scattered = RowParallelLinear(f, h, bias=False, input_is_parallel=False)
    for layer in (down_tp, down_scattered):
        layer.weight.weight_loader(layer.weight, down.weight.detach())
    qkv = QKVParallelLinear(h, d, MODEL.num_heads, MODEL.num_kv_heads, bias=False)
    for shard_id, ref in zip("qkv", (q, k, v)):
        qkv.weight.weight_loader(qkv.weight, ref.weight.detach(), shard_id)
    o_proj = RowParallelLinear(MODEL.num_heads * d, h, bias=False)
    o_proj.weight.weight_loader(o_proj.weight, o.weight.detach())
    for module in (gate, up, down, q, k, v, o, gate_up, gate_up_gathered, down_tp, down_scattered, qkv, o_proj):
        module.to(dev)
    x = x.to(dev)

    def reference_mlp(t: torch.Tensor) -> torch.Tensor:
        return down(F.silu(gate(t)) * up(t))

    blocks = {
        "MLP (column -> row)": (lambda t: mlp_block(t, gate_up, down_tp), reference_mlp),
        "attention (QKV -> o_proj)": (lambda t: attention_block(t, qkv, o_proj),
                                      lambda t: _reference_attention(t, q, k, v, o)),
        "MLP, gathered in between": (lambda t: mlp_block(t, gate_up_gathered, down_scattered), reference_mlp),
    }
    return [{"rank": rank, "block": name, **_run(block, ref, x)} for name, (block, ref) in blocks.items()]


def check_tp_size(tp_size: int) -> None:
    """Raise a ``ValueError`` naming valid sizes before any rank starts."""
    validate_tp_size(MODEL.num_heads, MODEL.num_kv_heads, tp_size)
    divide(MODEL.intermediate_size, tp_size, "intermediate_size")


def run_block_demo(tp_size: int = 2, backend: str = "auto", seed: int = 0) -> list[dict[str, Any]]:
    """Launch ``tp_size`` ranks; one row per (rank, block), sorted by rank.

    Each row: ``rank``, ``block``, ``forward`` and ``backward`` (collective name -> calls on this rank),
    ``output ok`` and ``input grad ok`` (versus the unsharded reference).
    """
    check_tp_size(tp_size)
    per_rank = launch(_block_worker, tp_size, seed, backend=backend)
    return sorted((row for rows in per_rank for row in rows), key=lambda r: r["rank"])


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name}" for name, n in sorted(counts.items())) or "none"


def format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'rank':>4}  {'block':<27}{'forward':<28}{'backward':<28}{'output':<8}input grad"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['rank']:>4}  {r['block']:<27}{_counts(r['forward']):<28}{_counts(r['backward']):<28}"
                     f"{'ok' if r['output ok'] else 'WRONG':<8}{'ok' if r['input grad ok'] else 'WRONG'}")
    return "\n".join(lines)


def block_verdict(rows: list[dict[str, Any]]) -> str:
    """One sentence: do the blocks match their references, and what did each cost in collectives."""
    wrong = sorted({r["block"] for r in rows if not (r["output ok"] and r["input grad ok"])})
    if wrong:
        return f"MISMATCH: {', '.join(wrong)} differ from the unsharded reference."
    first = {r["block"]: r for r in rows if r["rank"] == rows[0]["rank"]}
    paired = [first[b] for b in ("MLP (column -> row)", "attention (QKV -> o_proj)") if b in first]
    one_each = all(r["forward"] == {"all_reduce": 1} == r["backward"] for r in paired)
    naive = first.get("MLP, gathered in between")
    extra = "" if naive is None else (f"; gathering the MLP's hidden activations in between costs "
                                      f"{_counts(naive['forward'])} forward and {_counts(naive['backward'])} "
                                      f"backward for the same result")
    return ("every block matches its unsharded reference (output and input gradient) on every rank; "
            + ("the MLP and the attention block each cost exactly one all-reduce forward and one backward"
               if one_each else "UNEXPECTED collective counts for the paired blocks (see the table)") + extra + ".")


def format_report(rows: list[dict[str, Any]], tp_size: int, backend: str) -> str:
    """What ran, what to look for, the table (:func:`format_table`) and a one-line verdict."""
    from hybridpar.demos.explain import intro, verdict

    ran = [f"an MLP block and an attention block of qwen2-tiny's shape (hidden {MODEL.hidden_size}, intermediate "
           f"{MODEL.intermediate_size}, {MODEL.num_heads} query / {MODEL.num_kv_heads} KV heads) on {tp_size} ranks, "
           f"{backend}, forward and backward over {TOKENS} tokens",
           "random weights from one seed (no checkpoint); the reference is the same block unsharded; a third "
           "block gathers the MLP's activations between its two matmuls, the naive way"]
    look = ["forward / backward: the torch.distributed collectives each rank called (the f and g operators of "
            "chapter 3 put one all-reduce in each direction)",
            "output / input grad: ok when the rank's result equals the unsharded block's"]
    return "\n".join([intro("Tensor-parallel blocks", ran, look), format_table(rows), verdict(block_verdict(rows))])


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2, help="number of tensor-parallel ranks (default 2)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="gloo (CPU), nccl (GPU) or auto")
    args = parser.parse_args(argv)
    try:
        rows = run_block_demo(args.tp, args.backend)
    except ValueError as exc:  # a TP size the tiny model cannot use, found before spawning
        parser.error(str(exc))
    from hybridpar.distributed.launcher import resolve_backend

    backend = "gloo (CPU)" if resolve_backend(args.backend, args.tp) == "gloo" else "NCCL (GPU)"
    print(format_report(rows, args.tp, backend))
    return 0 if all(r["output ok"] and r["input grad ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
