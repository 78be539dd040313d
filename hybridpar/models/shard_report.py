"""What each tensor-parallel rank holds: per-rank parameter counts, bytes, shard shapes, load stats.

For notebooks::

    from hybridpar.models.shard_report import inspect_tp, format_reports
    reports = inspect_tp(tp_size=2)            # launches 2 ranks, each loads its shards
    print(format_reports(reports))

Each rank returns a :class:`RankReport`: every parameter it holds with its local shape and how it
is split (``column``: output rows, ``row``: input columns, ``vocab``: vocabulary rows,
``replicated``: whole), plus its :class:`~hybridpar.models.loader.LoadStats`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hybridpar.layers.linear import ColumnParallelLinear, RowParallelLinear
from hybridpar.layers.vocab_parallel_embedding import VocabParallelEmbedding


@dataclass
class TensorShard:
    name: str
    local_shape: list[int]
    split: str  # "column", "row", "vocab" or "replicated"
    dtype: str
    bytes: int


@dataclass
class RankReport:
    rank: int
    tp_rank: int
    tp_size: int
    num_parameters: int  # held by this rank (tied weights once)
    parameter_bytes: int
    full_model_parameters: int  # of the unsharded checkpoint
    q_heads: int
    kv_heads: int
    vocab_rows: tuple[int, int]  # [start, end) of the padded vocabulary
    tensors: list[TensorShard] = field(default_factory=list)
    load_stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _split_kind(module: nn.Module, param_name: str) -> str:
    if isinstance(module, VocabParallelEmbedding):
        return "vocab"
    if isinstance(module, ColumnParallelLinear):
        return "column"
    if isinstance(module, RowParallelLinear):
        return "row" if param_name == "weight" else "replicated"
    return "replicated"


def shard_table(model: nn.Module) -> list[TensorShard]:
    """Every parameter of ``model`` (once, even if tied) with its local shape and split."""
    seen: set[int] = set()
    rows = []
    for mod_name, module in model.named_modules():
        for p_name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mod_name}.{p_name}" if mod_name else p_name
            rows.append(TensorShard(full, list(p.shape), _split_kind(module, p_name), str(p.dtype).removeprefix("torch."),
                                    p.numel() * p.element_size()))
    return rows


def rank_report(wrapper: Any) -> RankReport:
    """Report for this rank of a :class:`~hybridpar.models.model_wrapper.TPRadixAttentionModelWrapper`."""
    import torch.distributed as dist

    model = wrapper.model
    tensors = shard_table(model)
    attn = model.model.layers[0].self_attn
    shard = model.model.embed_tokens.shard
    return RankReport(
        rank=dist.get_rank() if dist.is_initialized() else 0,
        tp_rank=wrapper.tp_group.rank_in_group,
        tp_size=wrapper.tp_group.world_size,
        num_parameters=sum(torch.Size(t.local_shape).numel() for t in tensors),
        parameter_bytes=sum(t.bytes for t in tensors),
        full_model_parameters=wrapper.config.num_parameters(),
        q_heads=attn.num_heads,
        kv_heads=attn.num_kv_heads,
        vocab_rows=(shard.start, shard.end),
        tensors=tensors,
        load_stats=wrapper.load_stats.to_dict(),
    )


def inspect_worker(tp_size: int, model_name: str | None = None, load_format: str = "sharded",
                   dtype: str = "fp32") -> RankReport:
    """Runs in each rank: initialise TP, load the model, report what this rank holds."""
    from hybridpar.distributed.parallel_state import initialize_tensor_parallel
    from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper

    initialize_tensor_parallel(tp_size)
    return rank_report(TPRadixAttentionModelWrapper(model_name, dtype=dtype, load_format=load_format))


def inspect_tp(model_name: str | None = None, tp_size: int = 2, load_format: str = "sharded",
               dtype: str = "fp32", backend: str = "auto") -> list[RankReport]:
    """Launch ``tp_size`` ranks that each load ``model_name`` and return their :class:`RankReport` (by rank).

    Bad input (unknown model, a TP size that does not fit the heads) fails here, before any spawn.
    """
    from hybridpar.distributed.launcher import launch
    from hybridpar.models.config import ModelConfig, check_tp_size
    from hybridpar.models.default_checkpoint import resolve_model

    path = resolve_model(model_name)
    check_tp_size(ModelConfig.from_pretrained(path), tp_size)
    return launch(inspect_worker, tp_size, tp_size, str(path), load_format, dtype, backend=backend)


def format_reports(reports: list[RankReport]) -> str:
    """A per-rank summary table, then the shard shapes of the first layer and the embeddings."""
    lines = [f"{'rank':>4} {'params':>12} {'MiB':>9} {'q/kv heads':>10} {'vocab rows':>14} {'read MiB':>9}"]
    for r in reports:
        read = r.load_stats.get("bytes_read", 0) / 2**20
        lines.append(f"{r.rank:>4} {r.num_parameters:>12,} {r.parameter_bytes / 2**20:>9.2f} "
                     f"{f'{r.q_heads}/{r.kv_heads}':>10} {f'[{r.vocab_rows[0]}, {r.vocab_rows[1]})':>14} {read:>9.2f}")
    full = reports[0].full_model_parameters
    lines.append(f"full model: {full:,} parameters; sum over ranks: {sum(r.num_parameters for r in reports):,} "
                 f"(replicated norms and vocabulary padding counted on every rank)")
    lines.append("")
    lines.append(f"{'tensor':<48} {'split':<10} " + " ".join(f"{'rank ' + str(r.rank):>14}" for r in reports))
    for i, t in enumerate(reports[0].tensors):
        if ".layers." in t.name and ".layers.0." not in t.name:
            continue
        shapes = " ".join(f"{str(r.tensors[i].local_shape):>14}" for r in reports)
        lines.append(f"{t.name:<48} {t.split:<10} {shapes}")
    return "\n".join(lines)
