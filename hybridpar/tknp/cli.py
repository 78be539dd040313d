"""The token-parallel command line, and ``run_demo`` for notebooks.

    python -m hybridpar.tknp.cli --tensor-parallel-size 1 --token-parallel-size 2 \\
        --enable-token-parallel --model-name qwen2-tiny --force-cpu

starts ``tp x tknp x dp`` ranks with ``hybridpar.launch``, builds each one as the engine does
(:mod:`hybridpar.tknp.runner`: a TKNP root runs the engine's
:class:`~hybridpar.tknp.radix_scheduler.TknpScheduler`, the other ranks of its TKNP group attend
for the requests placed on them; without token parallelism every replica runs a
:class:`~hybridpar.radix.scheduler.TPScheduler`), serves the prompts and prints, per rank, the
weights it holds, its KV pool and the new tokens it attended for, then each completion. This is
:class:`hybridpar.LLM`'s serving path with the ranks' own numbers shown; to just generate text use
``hybridpar generate``. ``torchrun --nproc-per-node N -m hybridpar.demos.tknp_demo <same flags>``
runs the same thing under torchrun. ``--compare-memory`` instead measures TP, DP and TKNP on the
same number of ranks with the same per-rank memory budget.

Flags (the seed's names): ``--tensor-parallel-size``, ``--token-parallel-size``,
``--enable-token-parallel``, ``--data-parallel-size``, ``--model-name``, ``--force-cpu``.
Invalid combinations -- token parallelism together with data parallelism,
``--enable-token-parallel`` with a token-parallel size of 1, a world size that is not the
product of the sizes, a TP size that does not divide the model's heads -- and bad prompts (empty,
or longer than ``--max-seq-len`` with the new tokens) print one line, ``<prog>: error: <reason>``,
and exit with status 2, before any rank starts (under torchrun rank 0 prints it, the others exit
quietly).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from hybridpar.config import ArgumentParser, ParallelConfig, ParallelConfigError, config_error
from hybridpar.models.sampling import SamplingParams
from hybridpar.tknp.memory import MemoryPlan
from hybridpar.tknp.runner import RankReport, TknpSetup, Workload, demo_rank, predicted_plan

CONFIG_ERRORS = (ParallelConfigError, ValueError, FileNotFoundError)

DEFAULT_PROMPTS = (
    "Token parallelism spreads attention over ranks.",
    "The root rank holds the weights;",
    "every other rank holds only KV cache.",
    "Hi",
)


def build_parser(prog: str = "python -m hybridpar.tknp.cli") -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog, description="Serve prompts with tensor x token parallelism.")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="TP ranks per model replica")
    parser.add_argument("--token-parallel-size", type=int, default=1, help="ranks per token-parallel group")
    parser.add_argument("--enable-token-parallel", action="store_true", default=None,
                        help="turn token parallelism on (implied by --token-parallel-size > 1)")
    parser.add_argument("--data-parallel-size", type=int, default=1,
                        help="independent replicas (mutually exclusive with token parallelism)")
    parser.add_argument("--model-name", default=None,
                        help="built-in (qwen2-tiny, llama-tiny, ...), local checkpoint directory or hub id; "
                             "default: the built-in qwen2-tiny")
    parser.add_argument("--force-cpu", action="store_true", help="gloo on the CPU even when GPUs are present")
    parser.add_argument("--prompt", action="append", dest="prompts", help="repeatable; default: a few demo prompts")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--memory-budget-mb", type=float, default=None,
                        help="per-rank memory for weights + KV cache (MB); default: every rank's KV pool holds "
                             "8 requests of --max-seq-len tokens")
    parser.add_argument("--max-seq-len", type=int, default=256,
                        help="the longest request, prompt + new tokens (a KV-pool row)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    parser.add_argument("--compare-memory", action="store_true",
                        help="measure weights and KV capacity per rank for TP, DP and TKNP on the same ranks")
    parser.add_argument("--json", action="store_true", help="also print one JSON line with the results")
    return parser


def parallel_config(args: argparse.Namespace) -> ParallelConfig:
    return ParallelConfig(tensor_parallel_size=args.tensor_parallel_size, token_parallel_size=args.token_parallel_size,
                          data_parallel_size=args.data_parallel_size, enable_token_parallel=args.enable_token_parallel)


def setup_from_args(args: argparse.Namespace) -> TknpSetup:
    config = parallel_config(args)
    budget = None if args.memory_budget_mb is None else int(args.memory_budget_mb * 1e6)
    return TknpSetup(model_name=args.model_name, tensor_parallel_size=config.tensor_parallel_size,
                     token_parallel_size=config.token_parallel_size if config.token_parallel_enabled else 1,
                     data_parallel_size=config.data_parallel_size, memory_budget_bytes=budget,
                     max_seq_len=args.max_seq_len, dtype=args.dtype)


def check_setup(setup: TknpSetup, world_size: int | None = None, page_size: int = 16) -> None:
    """Raise ``ParallelConfigError`` / ``ValueError`` naming the fix; runs before any rank starts. With a
    memory budget, every rank must keep at least one KV page besides the reserved one after its weights."""
    from hybridpar.models.config import ModelConfig, check_tp_size
    from hybridpar.models.default_checkpoint import resolve_model
    from hybridpar.models.model_wrapper import parse_dtype

    config = ParallelConfig(tensor_parallel_size=setup.tensor_parallel_size,
                            token_parallel_size=setup.token_parallel_size,
                            data_parallel_size=setup.data_parallel_size).validate()
    if world_size is not None:
        config.check_world_size(world_size)
    parse_dtype(setup.dtype)
    model = ModelConfig.from_pretrained(resolve_model(setup.model_name))
    if not 2 <= setup.max_seq_len <= model.max_position_embeddings:
        raise ValueError(f"--max-seq-len must be in [2, {model.max_position_embeddings}] (the model's "
                         f"max_position_embeddings), got {setup.max_seq_len}")
    check_tp_size(model, setup.tensor_parallel_size)
    if setup.memory_budget_bytes is not None:
        short = [r.rank for r in predicted_plan(setup, page_size).ranks if r.kv_tokens < page_size]
        if short:
            raise ValueError(f"a memory budget of {setup.memory_budget_bytes:,} bytes per rank leaves rank(s) {short} "
                             f"no KV page after their weights; raise --memory-budget-mb")


def parse_args(argv: Sequence[str] | None = None, world_size: int | None = None,
               prog: str = "python -m hybridpar.tknp.cli") -> tuple[argparse.Namespace, TknpSetup]:
    """Parse and validate; on invalid input print ``prog: error: <reason>`` (one line) and exit 2."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        config = parallel_config(args).validate()
        if world_size is not None:
            config.check_world_size(world_size)
        setup = setup_from_args(args)
        check_setup(setup)
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    except CONFIG_ERRORS as exc:
        config_error(prog, exc)
    return args, setup


# --------------------------------------------------------------------------- running


@dataclass
class DemoResult:
    """What ``run_demo`` returns: the setup, one report per rank, the prompts and completions."""

    setup: TknpSetup
    reports: list[RankReport]
    prompts: list[str]
    completions: list[str]
    placement: list[int]  # TKNP rank (or DP replica) that served each prompt

    def to_dict(self) -> dict[str, Any]:
        ranks = [{"rank": r.rank, "role": r.role, "tp_rank": r.tp_rank, "tknp_rank": r.tknp_rank,
                  "param_bytes": r.param_bytes, "parameter_objects": r.parameter_objects,
                  "kv_tokens": r.capacity.num_tokens, "kv_bytes": r.capacity.kv_bytes,
                  "worker_new_tokens": (r.worker_stats or {}).get("new_tokens")} for r in self.reports]
        return {"tensor_parallel_size": self.setup.tensor_parallel_size,
                "token_parallel_size": self.setup.token_parallel_size,
                "data_parallel_size": self.setup.data_parallel_size, "ranks": ranks,
                "completions": self.completions, "placement": self.placement}


def make_requests(token_ids: list[list[int]], max_new_tokens: int) -> Workload:
    """Greedy requests, all arriving at once (split them over DP replicas with ``Workload.split``)."""
    n = len(token_ids)
    return Workload("demo", [list(ids) for ids in token_ids], [SamplingParams(max_new_tokens=max_new_tokens)] * n, [0] * n)


def check_requests(setup: TknpSetup, requests: Workload, page_size: int = 16) -> None:
    """Raise ``ValueError`` naming the fix, in the parent, for a request no rank could serve: an empty
    prompt, ids outside the vocabulary, prompt + new tokens beyond ``max_seq_len``, or (with a memory
    budget) more KV pages than the largest pool that budget leaves (:func:`predicted_plan`)."""
    from hybridpar.models.config import ModelConfig
    from hybridpar.models.default_checkpoint import resolve_model

    vocab = ModelConfig.from_pretrained(resolve_model(setup.model_name)).vocab_size
    pool = None if setup.memory_budget_bytes is None else max(
        r.kv_tokens for r in predicted_plan(setup, page_size).ranks)
    for i, (ids, params) in enumerate(zip(requests.prompts, requests.sampling)):
        total = len(ids) + params.max_new_tokens
        if not ids:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}) (the model's vocabulary)")
        if total > setup.max_seq_len:
            raise ValueError(f"prompt {i} ({len(ids)} tokens) + {params.max_new_tokens} new tokens = {total} exceed "
                             f"--max-seq-len {setup.max_seq_len}; shorten the prompt or raise --max-seq-len")
        if pool is not None and -(-(total - 1) // page_size) * page_size > pool:
            raise ValueError(f"prompt {i} needs {total - 1} KV tokens but the largest KV pool the memory budget "
                             f"leaves holds {pool}; raise --memory-budget-mb")


def load_tokenizer(setup: TknpSetup) -> Any:
    """The checkpoint's tokenizer (the parent tokenizes and decodes; ranks see token ids only)."""
    from transformers import AutoTokenizer

    from hybridpar.models.default_checkpoint import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(setup.model_name)), trust_remote_code=False)


def split_for_replicas(items: Sequence[Any], replicas: int) -> list[list[Any]]:
    """Round-robin share of each data-parallel replica."""
    return [list(items[d::replicas]) for d in range(replicas)]


def collect(setup: TknpSetup, reports: list[RankReport], prompts: list[str], tokenizer: Any) -> DemoResult:
    """Put the completions of every replica back in prompt order."""
    dp = setup.data_parallel_size
    order = split_for_replicas(list(range(len(prompts))), dp)
    completions, placement = [""] * len(prompts), [0] * len(prompts)
    for d in range(dp):  # replica d's first rank is d * tp, its leader (DP and TKNP exclude each other)
        leader = reports[d * setup.tensor_parallel_size]
        for i, tokens, rank in zip(order[d], leader.outputs, leader.placement):
            completions[i] = tokenizer.decode(tokens, skip_special_tokens=True)
            placement[i] = rank if setup.token_parallel_size > 1 else d
    return DemoResult(setup, reports, list(prompts), completions, placement)


def run_demo(model_name: str | None = None, tensor_parallel_size: int = 1, token_parallel_size: int = 2,
             enable_token_parallel: bool | None = None, data_parallel_size: int = 1,
             prompts: Sequence[str] = DEFAULT_PROMPTS, max_new_tokens: int = 16,
             memory_budget_bytes: int | None = None, max_seq_len: int = 256, dtype: str = "float32",
             force_cpu: bool = False, timeout: float = 300.0) -> DemoResult:
    """Serve ``prompts`` on ``tp x tknp x dp`` fresh ranks (``hybridpar.launch``); for notebooks.

    Raises ``ParallelConfigError`` (a ``ValueError``) or ``ValueError`` before starting anything, on
    invalid sizes or prompts (:func:`check_setup`, :func:`check_requests`).
    """
    from hybridpar.distributed.launcher import launch

    config = ParallelConfig(tensor_parallel_size=tensor_parallel_size, token_parallel_size=token_parallel_size,
                            data_parallel_size=data_parallel_size,
                            enable_token_parallel=enable_token_parallel).validate()
    setup = TknpSetup(model_name=model_name, tensor_parallel_size=tensor_parallel_size,
                      token_parallel_size=token_parallel_size if config.token_parallel_enabled else 1,
                      data_parallel_size=data_parallel_size, memory_budget_bytes=memory_budget_bytes,
                      max_seq_len=max_seq_len, dtype=dtype)
    check_setup(setup)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(setup)
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    requests = make_requests([list(tokenizer(p).input_ids) for p in prompts], max_new_tokens)
    check_requests(setup, requests)
    per_replica = requests.split(data_parallel_size)
    world = config.world_size if config.token_parallel_enabled else tensor_parallel_size * data_parallel_size
    reports = launch(demo_rank, world, setup, per_replica, backend="gloo" if force_cpu else "auto", timeout=timeout)
    return collect(setup, reports, list(prompts), tokenizer)


def attended_tokens(report: RankReport) -> int:
    """New tokens a rank ran attention for (the table's "attended" column): a worker counts its own; a
    root, the new tokens its scheduler's passes placed on its TKNP rank (all of them without TKNP)."""
    return report.attended_tokens


def format_reports(reports: Sequence[RankReport]) -> str:
    """One row per rank: role, weights, KV pool (request rows, tokens, bytes), new tokens attended."""
    lines = [f"{'rank':>4} {'role':<9} {'tp':>2} {'tknp':>4} {'weights (B)':>12} {'nn.Params':>9} "
             f"{'KV rows':>7} {'KV tokens':>9} {'KV bytes':>10} {'attended':>8}"]
    for r in reports:
        attended = f"{attended_tokens(r):,}"  # roots attend too, for the requests placed on them
        c = r.capacity
        lines.append(f"{r.rank:>4} {r.role:<9} {r.tp_rank:>2} {r.tknp_rank:>4} {r.param_bytes:>12,} "
                     f"{r.parameter_objects:>9} {c.num_slots:>7} {c.num_tokens:>9,} {c.kv_bytes:>10,} {attended:>8}")
    return "\n".join(lines)


def format_demo(result: DemoResult) -> str:
    s = result.setup
    head = (f"TP {s.tensor_parallel_size} x TKNP {s.token_parallel_size} x DP {s.data_parallel_size}, "
            f"model {s.model_name or 'qwen2-tiny'}")
    where = "tknp rank" if s.token_parallel_size > 1 else "replica"
    body = [f"[{where} {r}] {p!r} -> {c!r}" for p, c, r in zip(result.prompts, result.completions, result.placement)]
    return "\n".join([head, format_reports(result.reports), *body])


@dataclass
class MeasuredLayout:
    """One layout of :func:`measure_memory`: its reports and the accounting it should match."""

    label: str
    setup: TknpSetup
    reports: list[RankReport] | None = None
    error: str | None = None
    page_size: int = 16

    @property
    def kv_tokens_total(self) -> int:
        """Distinct tokens cached: per TP group (a token's KV owner), its smallest rank capacity, summed."""
        tp = self.setup.tensor_parallel_size
        caps = [r.capacity.num_tokens for r in self.reports or []]
        return sum(min(caps[i:i + tp]) for i in range(0, len(caps), tp))

    def predicted(self) -> MemoryPlan:
        """What :func:`hybridpar.tknp.memory.plan_memory` claims for this layout."""
        return predicted_plan(self.setup, self.page_size)


def measure_memory(model_name: str | None = None, num_ranks: int = 2, memory_budget_bytes: int = 16_000_000,
                   tknp_tensor_parallel_size: int = 1, max_seq_len: int = 64, force_cpu: bool = True,
                   timeout: float = 300.0) -> list[MeasuredLayout]:
    """Build (without serving) TP ``n``, DP ``n`` and TKNP on ``n`` ranks, all with the same per-rank
    budget, and collect what every rank holds (one launch; the layouts are built one after the
    other). A layout the model cannot take (TP ``n`` not dividing the heads), or whose ranks the budget
    leaves no KV page, gets ``error`` instead of reports."""
    from hybridpar.distributed.launcher import launch

    base = TknpSetup(model_name=model_name, memory_budget_bytes=memory_budget_bytes, max_seq_len=max_seq_len)
    t = tknp_tensor_parallel_size
    layouts = [MeasuredLayout(f"TP{num_ranks}", replace(base, tensor_parallel_size=num_ranks)),
               MeasuredLayout(f"DP{num_ranks}", replace(base, data_parallel_size=num_ranks)),
               MeasuredLayout(f"TP{t}xTKNP{num_ranks // t}" if t > 1 else f"TKNP{num_ranks}",
                              replace(base, tensor_parallel_size=t, token_parallel_size=num_ranks // t))]
    for layout in layouts:
        try:
            check_setup(layout.setup, num_ranks, layout.page_size)
        except CONFIG_ERRORS as exc:
            layout.error = str(exc)
    runnable = [layout for layout in layouts if layout.error is None]
    per_rank = launch(build_layouts_rank, num_ranks, [layout.setup for layout in runnable],
                      backend="gloo" if force_cpu else "auto", timeout=timeout)
    for i, layout in enumerate(runnable):
        layout.reports = [reports[i] for reports in per_rank]
    return layouts


def build_layouts_rank(setups: Sequence[TknpSetup]) -> list[RankReport]:
    """Every rank, for each setup in turn: build the groups and the rank (no requests), report, tear down."""
    from hybridpar.distributed.parallel_state import destroy_model_parallel

    reports = []
    for setup in setups:
        reports.append(demo_rank(setup, make_requests([], 1).split(setup.data_parallel_size)))
        destroy_model_parallel()
    return reports


def format_memory(layouts: Sequence[MeasuredLayout]) -> str:
    """Per-rank weights and KV capacity of each layout, then the distinct tokens each caches (measured
    and as :mod:`hybridpar.tknp.memory` predicts)."""
    lines = []
    for layout in layouts:
        lines.append(f"== {layout.label}")
        lines.append(layout.error if layout.error else format_reports(layout.reports))
    lines.append(f"{'layout':<12} {'weights, all ranks (B)':>22} {'distinct KV tokens':>18} {'predicted':>9}")
    for layout in layouts:
        if not layout.error:
            weights = sum(r.param_bytes for r in layout.reports)
            lines.append(f"{layout.label:<12} {weights:>22,} {layout.kv_tokens_total:>18,} "
                         f"{layout.predicted().kv_tokens_total:>9,}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "python -m hybridpar.tknp.cli") -> int:
    args, setup = parse_args(argv, prog=prog)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.compare_memory:
            world = parallel_config(args).world_size
            budget = setup.memory_budget_bytes or 16_000_000
            print(format_memory(measure_memory(setup.model_name, world, budget, setup.tensor_parallel_size,
                                               setup.max_seq_len, args.force_cpu)))
            return 0
        result = run_demo(setup.model_name, setup.tensor_parallel_size, setup.token_parallel_size,
                          args.enable_token_parallel, setup.data_parallel_size, args.prompts or DEFAULT_PROMPTS,
                          args.max_new_tokens, setup.memory_budget_bytes, setup.max_seq_len, setup.dtype,
                          args.force_cpu)
    except CONFIG_ERRORS as exc:  # raised in this process, before any rank started
        config_error(prog, exc)
    print(format_demo(result))
    if args.json:
        print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
