"""Demo: a tensor-parallel model taken apart on real ranks: what each rank reads from the checkpoint,
what loading costs, and where the collectives of a forward pass happen.

One launch of ``tp_size`` ranks (:func:`run_anatomy`). Every rank

1. builds the TP decoder and loads the checkpoint both ways of :mod:`hybridpar.models.loader`:
   ``"sharded"`` (every parameter's ``weight_loader`` indexes a safetensors slice), then ``"full"``
   (every tensor read whole; the rank keeps its shard), and keeps each load's
   :class:`~hybridpar.models.loader.LoadStats` (bytes read, the process's peak RSS);
2. loads once more through :class:`RecordingSlice` handles, which log the index range of every read:
   which rows or columns of which checkpoint tensor this rank read (drawn by
   :mod:`hybridpar.viz.model_shards`);
3. runs one prefill of a prompt while tracing every ``torch.distributed`` collective, together with
   the module that called it.

Ranks never print; they return a :class:`RankAnatomy` and the parent formats them, sorted by rank::

    python -m hybridpar.demos.tp_anatomy --tp 2
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hybridpar.config import ArgumentParser
from hybridpar.demos.tp_block import patch_collectives
from hybridpar.models.loader import LoadStats, SliceProxy, iter_checkpoint

DEFAULT_PROMPT = "Tensor parallelism"


# --------------------------------------------------------------------------- recording reads
@dataclass(frozen=True)
class Read:
    """One read from a checkpoint tensor: a ``(start, stop)`` range per dimension, and its bytes."""

    ranges: tuple[tuple[int, int], ...]
    nbytes: int


@dataclass
class TensorReads:
    """Every read one rank made from one checkpoint tensor of shape ``shape``."""

    shape: tuple[int, ...]
    reads: list[Read] = field(default_factory=list)


def index_ranges(index: Any, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The ``(start, stop)`` range per dimension selected by ``index`` (slices only, as the loaders use)."""
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > len(shape) or not all(isinstance(i, slice) and i.step in (None, 1) for i in index):
        raise TypeError(f"only contiguous slices are recorded, got {index!r} for shape {list(shape)}")
    index = index + (slice(None),) * (len(shape) - len(index))
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


class RecordingSlice(SliceProxy):
    """Wraps a safetensors slice handle and records the range of every read made through it."""

    def __init__(self, handle: Any, record: TensorReads) -> None:
        super().__init__(handle)
        self._record = record

    def _on_read(self, index: Any, out: torch.Tensor) -> None:
        ranges = index_ranges(index, self._record.shape)
        self._record.reads.append(Read(ranges, out.numel() * out.element_size()))


def record_reads(model: nn.Module, path: str | Path) -> dict[str, TensorReads]:
    """Load ``path`` sharded into ``model`` once more, recording every read, in checkpoint order."""
    reads: dict[str, TensorReads] = {}

    def recorded(weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        for name, handle in weights:
            reads[name] = TensorReads(tuple(handle.get_shape()))
            yield name, RecordingSlice(handle, reads[name])

    with torch.no_grad():
        model.load_weights(recorded(iter_checkpoint(Path(path), LoadStats(mode="sharded"))))
    return reads


# --------------------------------------------------------------------------- tracing collectives
@dataclass(frozen=True)
class CollectiveCall:
    """A ``torch.distributed`` collective, the innermost module running when it was called, and the
    shape of the tensor this rank contributed."""

    module: str
    collective: str
    shape: tuple[int, ...]


@contextmanager
def trace_collectives(model: nn.Module) -> Iterator[list[CollectiveCall]]:
    """Record every collective called inside the ``with`` block, attributed to ``model``'s submodules."""
    calls: list[CollectiveCall] = []
    stack: list[str] = []
    hooks = []

    def enter(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            stack.append(name)
        return hook

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    for name, module in model.named_modules():
        hooks.append(module.register_forward_pre_hook(enter(name)))
        hooks.append(module.register_forward_hook(leave))

    def record(collective: str, args: tuple) -> None:
        tensor = next(a for a in reversed(args) if isinstance(a, torch.Tensor))
        calls.append(CollectiveCall(stack[-1] if stack else "", collective, tuple(tensor.shape)))

    try:
        with patch_collectives(record):
            yield calls
    finally:
        for hook in hooks:
            hook.remove()


# --------------------------------------------------------------------------- the worker
@dataclass
class RankAnatomy:
    """What one rank returns: its loads, its reads, and the collectives of one prefill."""

    rank: int
    tp_size: int
    loads: list[LoadStats]  # "sharded", then "full"
    reads: dict[str, TensorReads]
    collectives: list[CollectiveCall]
    num_tokens: int


def anatomy_worker(tp_size: int, path: str, prompt_ids: list[int]) -> RankAnatomy:
    """Runs in every rank: load both ways, record the sharded reads, trace one prefill."""
    from hybridpar.distributed.launcher import current_device
    from hybridpar.distributed.parallel_state import initialize_tensor_parallel
    from hybridpar.models.attention_backend import ForwardBatch
    from hybridpar.models.config import ModelConfig
    from hybridpar.models.decoder import DecoderForCausalLM
    from hybridpar.models.loader import load_checkpoint

    initialize_tensor_parallel(tp_size)
    config = ModelConfig.from_pretrained(path)
    device = current_device()
    loads = []
    for load_format in ("sharded", "full"):
        with torch.device(device):
            model = DecoderForCausalLM(config, dtype=torch.float32).eval()
        loads.append(load_checkpoint(model, path, load_format))
    reads = record_reads(model, path)
    cache = model.make_kv_cache(1, len(prompt_ids))
    batch = ForwardBatch.build(cache, cache.alloc(1), [0], [len(prompt_ids)], device)
    with torch.no_grad(), trace_collectives(model) as calls:
        hidden = model(torch.tensor(prompt_ids, device=device), batch.positions, batch)
        model.compute_logits(hidden[batch.last_token_indices()])
    return RankAnatomy(dist.get_rank(), tp_size, loads, reads, calls, len(prompt_ids))


def run_anatomy(model_name: str | None = None, tp_size: int = 2, prompt: str = DEFAULT_PROMPT,
                backend: str = "gloo") -> list[RankAnatomy]:
    """Launch ``tp_size`` ranks on ``model_name`` (default: the built-in qwen2-tiny); results by rank.

    The model and the TP size are checked here, before any process starts.
    """
    from transformers import AutoTokenizer

    from hybridpar.distributed.launcher import launch
    from hybridpar.models.config import ModelConfig, check_tp_size
    from hybridpar.models.default_checkpoint import resolve_model

    path = resolve_model(model_name)
    check_tp_size(ModelConfig.from_pretrained(path), tp_size)
    prompt_ids = list(AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)(prompt).input_ids)
    return launch(anatomy_worker, tp_size, tp_size, str(path), prompt_ids, backend=backend, timeout=300.0)


# --------------------------------------------------------------------------- formatting
def format_loads(results: list[RankAnatomy]) -> str:
    """One row per rank and load format: bytes read, their share of the checkpoint, peak RSS."""
    lines = [f"{'rank':>4}  {'load':<8} {'read KiB':>9} {'of checkpoint':>14} {'peak RSS MiB':>13}"]
    for r in sorted(results, key=lambda r: r.rank):
        for s in r.loads:
            lines.append(f"{r.rank:>4}  {s.mode:<8} {s.bytes_read / 1024:>9,.1f} "
                         f"{s.bytes_read / s.checkpoint_bytes:>14.0%} {s.peak_rss_bytes / 2**20:>13.0f}")
    lines.append(f"checkpoint: {results[0].loads[0].checkpoint_bytes / 1024:,.1f} KiB of tensors")
    return "\n".join(lines)


def format_collectives(results: list[RankAnatomy]) -> str:
    """The collectives of one prefill, in call order (once if every rank called the same ones)."""
    results = sorted(results, key=lambda r: r.rank)
    same = all(r.collectives == results[0].collectives for r in results)
    groups = [("every rank", results[0])] if same else [(f"rank {r.rank}", r) for r in results]
    lines = [f"prefill of {results[0].num_tokens} tokens on {results[0].tp_size} ranks, then the logits of the last one"]
    for who, r in groups:
        lines.append(f"{who} called, in this order:")
        width = max(len(c.module) for c in r.collectives)
        for i, c in enumerate(r.collectives, 1):
            lines.append(f"  {i:>2}  {c.module:<{width}}  {c.collective:<10} {list(c.shape)}")
    return "\n".join(lines)


def anatomy_verdict(results: list[RankAnatomy]) -> str:
    """One sentence: what sharded loading saved, and the collectives one prefill needed."""
    results = sorted(results, key=lambda r: r.rank)
    shares = [r.loads[0].bytes_read / r.loads[0].checkpoint_bytes for r in results]
    calls = results[0].collectives
    reduces = sum(c.collective == "all_reduce" for c in calls)
    gathers = sum(c.collective.startswith("all_gather") for c in calls)
    same = all(r.collectives == calls for r in results)
    return (f"sharded loading read {100 * min(shares):.0f}-{100 * max(shares):.0f} % of the checkpoint per rank, "
            f"full loading 100 %; one prefill called {reduces} all-reduces (2 per layer, 1 for the embedding) and "
            f"{gathers} all-gather (the logits) " + ("on every rank, in the same order." if same else
                                                     "-- but NOT the same on every rank."))


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description="What each TP rank reads, what loading costs, where the collectives are.")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--model-name", default=None, help="built-in name or local checkpoint (default: qwen2-tiny)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl", "auto"])
    args = parser.parse_args(argv)
    from hybridpar.demos.explain import intro, model_line, verdict

    print(intro("A tensor-parallel model, taken apart", [
        model_line(args.model_name),
        f"TP {args.tp} on {args.backend}: each rank loads the checkpoint sharded and in full, records which "
        f"rows and columns of each tensor it read, then runs one prefill of {args.prompt!r} while tracing every "
        f"collective"], [
        "read KiB: a rank reads only its shard when loading sharded, the whole file when loading in full",
        "the collectives: one all-reduce after the embedding and after each row-parallel layer (o_proj, "
        "down_proj), one all-gather for the vocabulary-parallel logits"]))
    results = run_anatomy(args.model_name, args.tp, args.prompt, args.backend)
    print(format_loads(results))
    print()
    print(format_collectives(results))
    print(verdict(anatomy_verdict(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
