"""Correctness of token parallelism: TKNP against TP alone and transformers, on the engine's own schedulers.

    python -m hybridpar.tknp.verify --token-parallel-size 2                 # 2 ranks, NCCL if 2 GPUs
    python -m hybridpar.tknp.verify --tensor-parallel-size 2 --token-parallel-size 2 --backend gloo

Every rank is started by ``hybridpar.launch`` and built as the engine builds it
(:mod:`hybridpar.tknp.runner`): the roots run a :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler`
(a paged pool and a radix tree per TKNP rank), the other ranks an attention worker. The roots serve
the workloads of :func:`default_workloads` in turn on that one scheduler: prompts of different
lengths, requests that join and finish mid-run, then prompts sharing system prefixes twice (the
second time arriving over time, and hitting what the first run left in each rank's radix tree).
Then they release the workers and serve the same workloads with token parallelism off: a plain
:class:`~hybridpar.radix.scheduler.TPScheduler` that runs at most 3 requests at a time (so some
wait), the TP-only reference, and a ``TknpScheduler`` without a group, which must serve exactly
like it. The leading root records the logits it sampled every token from
(:class:`~hybridpar.tknp.runner.RecordingScheduler`).

The parent compares tokens and logits of the two, and with transformers' model on the same
checkpoint (same dtype, CPU); each worker's mirror pools must equal the root's bookkeeping of its
rank, and no worker may hold an ``nn.Parameter``. It prints a table and one JSON line
(``{"ok": ..., ...}``). Exit status 0 when everything matches: identical greedy tokens everywhere,
and logits within ``--atol`` (fp32) or, with ``--dtype bf16``/``fp16``, within the TP model's
low-precision tolerance (relative L2 error per position <= :data:`~hybridpar.models.verify.LOW_PRECISION_RTOL`).

    python -m hybridpar.tknp.verify --tensor-parallel-size 2 --token-parallel-size 2 --dtype bf16  # 4 GPUs
"""

from __future__ import annotations

import functools
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from hybridpar.config import ArgumentParser
from hybridpar.distributed.launcher import BACKENDS, launch
from hybridpar.distributed.parallel_state import is_tknp_root
from hybridpar.models.sampling import SamplingParams
from hybridpar.radix.scheduler import TPScheduler
from hybridpar.tknp.radix_scheduler import TknpScheduler
from hybridpar.tknp.runner import (
    TknpSetup,
    Workload,
    build_paged_worker,
    build_scheduler,
    ensure_groups,
    parameter_objects_alive,
    recording,
    serve_workload,
)

DEFAULT_MODELS = ("qwen2-tiny", "llama-tiny")


def default_workloads(seed: int = 7, vocab: int = 256) -> list[Workload]:
    """A ragged batch (prompts of 1..20 tokens), requests that join and leave mid-run (request 1 may stop
    early on EOS), and 2 groups x 3 prompts sharing a 24-token system prompt, served twice: all at once,
    then arriving over 6 steps (the second run hits the first run's prefixes)."""
    from hybridpar.radix.workload import SharedPrefixWorkload

    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(0, vocab) for _ in range(n)]

    lengths = (1, 3, 7, 12, 20)
    ragged = Workload("ragged", [prompt(n) for n in lengths],
                      [SamplingParams(max_new_tokens=5, ignore_eos=True)] * len(lengths), [0] * len(lengths))
    shape = [(5, 0, 3), (9, 0, 7), (2, 1, 2), (15, 3, 5), (4, 4, 4), (8, 6, 3)]  # (prompt, arrival, max_new_tokens)
    joining = Workload("joining", [prompt(n) for n, _, _ in shape],
                       [SamplingParams(max_new_tokens=m, ignore_eos=i != 1) for i, (_, _, m) in enumerate(shape)],
                       [a for _, a, _ in shape])
    shared = SharedPrefixWorkload(num_groups=2, prompts_per_group=3, system_len=24, question_len=5, output_len=4,
                                  vocab_size=vocab, seed=3).requests(shuffle=True)
    prompts = [r.prompt_ids for r in shared]
    sampling = [SamplingParams(max_new_tokens=2 + i % 4, ignore_eos=True) for i in range(len(prompts))]
    return [ragged, joining, Workload("prefix", prompts, sampling, [0] * len(prompts)),
            Workload("prefix-again", prompts, sampling, [0, 0, 1, 2, 4, 5])]


# --------------------------------------------------------------------------- ranks
def verify_rank(setup: TknpSetup, workloads: Sequence[Workload], page_size: int = 8, reference_rows: int = 3,
                extra: Callable[[TknpScheduler, Sequence[Workload]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every rank (see the module docstring). Roots: the TKNP runs, the workers' release, the TP-only
    runs (and ``extra(scheduler, workloads)``); workers: attention until released. Returns what the
    parent compares."""
    if setup.token_parallel_size < 2:
        raise ValueError(f"verify_rank compares token parallelism with TP alone: token_parallel_size must be >= 2, "
                         f"got {setup.token_parallel_size}")
    ensure_groups(setup)
    start = time.perf_counter()
    if not is_tknp_root():
        worker = build_paged_worker(setup, page_size=page_size)
        stats = worker.serve()
        return {"role": "attention", "capacity": worker.capacity, "capacities": worker.capacities,
                "stats": stats.to_dict(), "digest": worker.pool_digest(),
                "parameter_objects": parameter_objects_alive(), "seconds": time.perf_counter() - start}
    sched = build_scheduler(setup, page_size, record=True, debug_checks=True)
    res: dict[str, Any] = {"role": "root", "capacities": sched.capacities, "pool_tokens": sched.allocator.size,
                           "param_bytes": sum(p.numel() * p.element_size() for p in sched.model.parameters()),
                           "runs": {}, "reference": {}, "fallback": {}}
    try:
        for w in workloads:
            res["runs"][w.name] = serve_workload(sched, w)
        res["digests"] = sched.rank_digests() if sched.is_leader else None
    finally:
        sched.shutdown()
    res["seconds"] = time.perf_counter() - start
    sizes = dict(max_total_tokens=4096, max_running_requests=reference_rows, max_context_len=setup.max_seq_len)
    plain = recording(TPScheduler)(sched.wrapper, **sizes)
    alone = recording(TknpScheduler)(sched.wrapper, None, **sizes)  # token parallelism off
    for w in workloads:
        res["reference"][w.name] = serve_workload(plain, w)
        res["fallback"][w.name] = serve_workload(alone, w)
    if extra is not None:
        res.update(extra(sched, workloads))
    res["parameter_objects"] = parameter_objects_alive()  # the root's model is still alive here
    return res


def _verify_models(models: Sequence[str], setup: TknpSetup, workloads: Sequence[Workload],
                   page_size: int) -> dict[str, Any]:
    return {name: verify_rank(replace(setup, model_name=name), workloads, page_size) for name in models}


# --------------------------------------------------------------------------- the parent's checks
@functools.cache
def _hf_model(model_name: str | None, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    from hybridpar.models.default_checkpoint import resolve_model

    return AutoModelForCausalLM.from_pretrained(str(resolve_model(model_name)), dtype=dtype).eval()


def hf_logits(model_name: str | None, prompt: list[int], tokens: list[int],
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """transformers' CPU logits (model in ``dtype``, as the TP model's check compares like with like) at
    the positions where each of ``tokens`` was chosen."""
    with torch.no_grad():
        logits = _hf_model(model_name, dtype)(torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)].float()


def check_models(models: Sequence[str | None], tensor_parallel_size: int) -> None:
    """Raise (before any rank starts) unless every model exists and ``tensor_parallel_size`` shards it."""
    from hybridpar.models.config import ModelConfig, check_tp_size
    from hybridpar.models.default_checkpoint import resolve_model

    for name in models:
        check_tp_size(ModelConfig.from_pretrained(resolve_model(name)), tensor_parallel_size)


@dataclass
class CheckRow:
    model: str
    workload: str
    request: int
    tknp_rank: int
    tokens: int
    cached: int  # prompt tokens served from the rank's radix cache
    same_tokens_as_tp: bool
    max_diff_tp: float
    same_tokens_as_hf: bool | None = None
    max_diff_hf: float | None = None
    tie_at: int | None = None  # low precision: the position where the run left the reference at a near tie


@dataclass
class VerifyResult:
    ok: bool
    setup: TknpSetup
    backend: str
    rows: list[CheckRow] = field(default_factory=list)
    ranks: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        hf = [r.max_diff_hf for r in self.rows if r.max_diff_hf is not None]
        return {"ok": self.ok, "dtype": self.setup.dtype, "tensor_parallel_size": self.setup.tensor_parallel_size,
                "token_parallel_size": self.setup.token_parallel_size, "backend": self.backend,
                "requests": len(self.rows), "tokens_identical": all(r.same_tokens_as_tp for r in self.rows),
                "max_abs_logit_diff_tp": max(r.max_diff_tp for r in self.rows),
                "max_abs_logit_diff_hf": max(hf) if hf else None, "ranks": self.ranks,
                "seconds": round(self.seconds, 2)}


def tokens_agree(got: list[int], ref: list[int], ref_logits: torch.Tensor, dtype: torch.dtype) -> tuple[bool, int]:
    """Whether two greedy continuations agree, and over how many positions to compare their logits.

    Identical: ``(True, len)``. In bf16/fp16 a run may also leave the reference at a near tie (vLLM's
    tests accept the same): at the first position ``j`` where they differ, the reference's logits of the
    two tokens are within ``LOW_PRECISION_RTOL`` of its largest logit. After ``j`` the inputs differ, so
    only positions ``0..j`` are compared: ``(True, j + 1)``. In fp32 any difference is a failure.
    """
    if got == ref:
        return True, len(ref)
    j = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
    if j >= min(len(got), len(ref)) or not near_tie(ref_logits[j], ref[j], got[j], dtype):
        return False, 0
    return True, j + 1


def near_tie(logits: torch.Tensor, best: int, other: int, dtype: torch.dtype) -> bool:
    """Low precision only: ``other``'s logit is within ``LOW_PRECISION_RTOL`` of the largest logit of ``best``."""
    from hybridpar.models.verify import LOW_PRECISION_RTOL

    row = logits.float()
    return dtype != torch.float32 and bool(row[best] - row[other] <= LOW_PRECISION_RTOL * row.abs().max())


def logit_error(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """fp32: max |difference|; lower precision: max relative L2 error per position (the TP model's criterion)."""
    from hybridpar.models.verify import max_relative_error

    if dtype == torch.float32:
        return float((got.float() - ref.float()).abs().max())
    return max_relative_error(got, ref)


def verify(models: Sequence[str] = DEFAULT_MODELS, tensor_parallel_size: int = 1, token_parallel_size: int = 2,
           backend: str = "auto", compare_hf: bool = True, atol: float = 1e-4, max_seq_len: int = 64,
           timeout: float = 600.0, dtype: str = "float32", page_size: int = 8) -> VerifyResult:
    """Launch ``tp * tknp`` ranks, serve with TKNP and TP alone, compare (see the module docstring).

    ``atol`` applies in fp32; in bf16/fp16 logits are held to ``LOW_PRECISION_RTOL`` instead.
    """
    from hybridpar.distributed.launcher import resolve_backend
    from hybridpar.models.verify import LOW_PRECISION_RTOL

    setup = TknpSetup(tensor_parallel_size=tensor_parallel_size, token_parallel_size=token_parallel_size,
                      max_seq_len=max_seq_len, max_requests_per_rank=4, dtype=dtype)
    if setup.torch_dtype != torch.float32:
        atol = LOW_PRECISION_RTOL
    workloads = default_workloads()
    backend = resolve_backend(backend, tensor_parallel_size * token_parallel_size)
    check_models(models, tensor_parallel_size)
    start = time.perf_counter()
    per_rank = launch(_verify_models, tensor_parallel_size * token_parallel_size, models, setup, workloads, page_size,
                      backend=backend, timeout=timeout)
    result = VerifyResult(True, setup, backend, seconds=time.perf_counter() - start)
    for name in models:
        ranks = [r[name] for r in per_rank]
        check_ranks(result, name, ranks, workloads, tensor_parallel_size, compare_hf, atol, setup.torch_dtype)
        for rank, r in enumerate(ranks):
            worker = r["role"] == "attention"
            result.ranks.append({"model": name, "rank": rank, "role": r["role"], "param_bytes": r.get("param_bytes", 0),
                                 "kv_tokens": (r["capacity"] if worker else r["capacities"][0]).num_tokens,
                                 "parameter_objects": r["parameter_objects"]})
    return result


def check_ranks(result: VerifyResult, name: str, ranks: list[dict], workloads: Sequence[Workload], tp: int,
                compare_hf: bool, atol: float, dtype: torch.dtype) -> None:
    """One deployment's ranks (roots first): TKNP vs TP alone on the same roots (tokens and logits), vs
    transformers, the fallback vs TP alone, and the workers (mirrors equal the bookkeeping, no weights)."""
    leader = ranks[0]
    for w in workloads:
        tokens = [o["tokens"] for o in leader["runs"][w.name]["requests"]]
        reference = [o["tokens"] for o in leader["reference"][w.name]["requests"]]
        result.ok &= all([o["tokens"] for o in r["runs"][w.name]["requests"]] == tokens for r in ranks[1:tp])
        result.ok &= all([o["tokens"] for o in r["fallback"][w.name]["requests"]] == reference for r in ranks[:tp])
        pairs = zip(leader["runs"][w.name]["requests"], leader["reference"][w.name]["requests"], w.prompts)
        for i, (got, ref, prompt) in enumerate(pairs):
            same, n = tokens_agree(got["tokens"], ref["tokens"], ref["logits"], dtype)
            row = CheckRow(name, w.name, i, got["rank"], len(got["tokens"]), got["cached"], same,
                           logit_error(got["logits"][:n], ref["logits"][:n], dtype) if same else float("inf"),
                           tie_at=None if n == len(ref["tokens"]) else n - 1)
            if compare_hf:
                hf = hf_logits(name, list(prompt), got["tokens"], dtype)
                row.same_tokens_as_hf = all(a == b or near_tie(hf[k], a, b, dtype)  # teacher-forced on ours
                                            for k, (a, b) in enumerate(zip(hf.argmax(-1).tolist(), got["tokens"])))
                row.max_diff_hf = logit_error(got["logits"], hf, dtype)
            result.ok &= row.same_tokens_as_tp and row.max_diff_tp <= atol
            result.ok &= not compare_hf or (row.same_tokens_as_hf and row.max_diff_hf <= atol)
            result.rows.append(row)
    for i, r in enumerate(ranks[tp:], start=tp):
        result.ok &= r["digest"] == leader["digests"][i // tp] and r["parameter_objects"] == 0


def format_result(result: VerifyResult) -> str:
    s = result.setup
    tp_name = f"TP {s.tensor_parallel_size}"
    err = "max|dlogit|" if s.torch_dtype == torch.float32 else "max rel err"
    lines = [f"TKNP {s.token_parallel_size} x TP {s.tensor_parallel_size} ({s.dtype}) on {result.backend} versus "
             f"{tp_name} (token parallelism off) and transformers ({s.dtype}, CPU)",
             f"{'model':<12} {'workload':<13} {'req':>3} {'rank':>4} {'tokens':>6} {'cached':>6} {'same as TP':>10} "
             f"{err + ' TP':>14} {'same as HF':>10} {err + ' HF':>14}"]
    for r in result.rows:
        hf_same = "-" if r.same_tokens_as_hf is None else ("yes" if r.same_tokens_as_hf else "NO")
        hf_diff = "-" if r.max_diff_hf is None else f"{r.max_diff_hf:.2e}"
        lines.append(f"{r.model:<12} {r.workload:<13} {r.request:>3} {r.tknp_rank:>4} {r.tokens:>6} {r.cached:>6} "
                     f"{('yes' if r.tie_at is None else f'tie@{r.tie_at}') if r.same_tokens_as_tp else 'NO':>10} {r.max_diff_tp:>14.2e} {hf_same:>10} {hf_diff:>14}")
    lines.append(f"{'model':<12} {'rank':>4} {'role':<10} {'weights (B)':>12} {'KV tokens':>10} {'nn.Parameters':>13}")
    for r in result.ranks:
        lines.append(f"{r['model']:<12} {r['rank']:>4} {r['role']:<10} {r['param_bytes']:>12,} {r['kv_tokens']:>10,} "
                     f"{r['parameter_objects']:>13}")
    lines.append("OK: token parallelism matches" if result.ok else "FAILED: token parallelism does not match")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m hybridpar.tknp.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--token-parallel-size", type=int, default=2)
    parser.add_argument("--model-name", action="append", dest="models",
                        help=f"repeatable; default: {' and '.join(DEFAULT_MODELS)}")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--no-hf", action="store_true", help="skip the comparison with transformers")
    parser.add_argument("--atol", type=float, default=1e-4, help="fp32 logit tolerance")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (then the relative tolerance "
                        "of python -m hybridpar.models.verify applies)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hybridpar.config import ParallelConfig, ParallelConfigError
    from hybridpar.distributed.launcher import resolve_backend
    from hybridpar.models.model_wrapper import parse_dtype

    try:
        ParallelConfig(tensor_parallel_size=args.tensor_parallel_size,
                       token_parallel_size=args.token_parallel_size).validate()
        if args.token_parallel_size < 2:
            raise ParallelConfigError("verify compares token parallelism with TP only: --token-parallel-size >= 2")
        check_models(args.models or DEFAULT_MODELS, args.tensor_parallel_size)
        resolve_backend(args.backend, args.tensor_parallel_size * args.token_parallel_size)
        dtype = str(parse_dtype(args.dtype)).removeprefix("torch.")
    except (ParallelConfigError, FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    result = verify(args.models or DEFAULT_MODELS, args.tensor_parallel_size, args.token_parallel_size,
                    args.backend, compare_hf=not args.no_hf, atol=args.atol, dtype=dtype)
    print(format_result(result))
    print(json.dumps(result.summary()))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
