"""Correctness of token parallelism: TKNP against TP-only (TP 1 when tp=1) and transformers.

    python -m hybridpar.tknp.verify --token-parallel-size 2                 # 2 ranks, NCCL if 2 GPUs
    python -m hybridpar.tknp.verify --tensor-parallel-size 2 --token-parallel-size 2 --backend gloo

Every rank is started by ``hybridpar.launch``. The roots serve two workloads with token
parallelism (a batch of prompts of different lengths, and requests that join and finish
mid-run), release the workers, then serve the same workloads again with token parallelism
disabled (one local cache, fewer rows, so some requests wait): the TP-only reference. Then the
same with RadixAttention: :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler` (a paged pool
and a radix tree per TKNP rank) on a shared-prefix workload, against a plain TPScheduler; the
workers' mirror pools must equal the root's bookkeeping. The parent compares tokens (and, for
the contiguous engine, logits) of the two, and with transformers' model on the same checkpoint
(same dtype, CPU), then prints a table and one JSON line (``{"ok": ..., ...}``). Exit status 0 when
everything matches: identical greedy tokens everywhere, and logits within ``--atol`` (fp32) or,
with ``--dtype bf16``/``fp16``, within the TP model's low-precision tolerance (relative L2 error
per position <= :data:`~hybridpar.models.verify.LOW_PRECISION_RTOL`).

    python -m hybridpar.tknp.verify --tensor-parallel-size 2 --token-parallel-size 2 --dtype bf16  # 4 GPUs
"""

from __future__ import annotations

import argparse
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

from hybridpar.distributed.launcher import BACKENDS, launch
from hybridpar.distributed.parallel_state import is_tknp_root
from hybridpar.models.sampling import SamplingParams
from hybridpar.tknp.attention import TokenParallelAttention
from hybridpar.tknp.engine import Request, RequestOutput, TknpEngine
from hybridpar.tknp.runner import TknpRoot, TknpSetup, Workload, build_worker, ensure_groups, parameter_objects_alive

DEFAULT_MODELS = ("qwen2-tiny", "llama-tiny")


def default_workloads(seed: int = 7, vocab: int = 256) -> list[Workload]:
    """A ragged batch (prompts of 1..20 tokens) and a workload whose requests join and leave mid-run."""
    rng = random.Random(seed)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(0, vocab) for _ in range(n)]

    greedy = SamplingParams(max_new_tokens=5, ignore_eos=True)
    ragged = [Request(prompt(n), greedy) for n in (1, 3, 7, 12, 20)]
    # (prompt length, arrival step, max_new_tokens); request 1 may also stop early on EOS
    shape = [(5, 0, 3), (9, 0, 7), (2, 1, 2), (15, 3, 5), (4, 4, 4), (8, 6, 3)]
    joining = [Request(prompt(n), SamplingParams(max_new_tokens=m, ignore_eos=i != 1), a)
               for i, (n, a, m) in enumerate(shape)]
    return [Workload("ragged", ragged, return_logits=True), Workload("joining", joining, return_logits=True)]


def summarize(outputs: Sequence[RequestOutput]) -> list[dict[str, Any]]:
    """Picklable per-request results (tokens, logits on the CPU, placement and timing)."""
    return [{"tokens": o.token_ids, "logits": o.logits, "rank": o.tknp_rank, "admitted": o.admitted_step,
             "finished": o.finished_step, "reason": o.finish_reason} for o in outputs]


def verify_rank(setup: TknpSetup, workloads: Sequence[Workload], reference_rows: int = 3,
                extra: Callable[[TknpRoot, Sequence[Workload]], dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every rank. Roots: TKNP runs, then TP-only reference runs (and ``extra(root, workloads)``);
    workers: serve. Returns what the parent compares."""
    ensure_groups(setup)
    if not is_tknp_root():
        worker = build_worker(setup)
        start = time.perf_counter()
        stats = worker.serve()
        return {"role": "attention", "capacity": worker.capacity, "capacities": worker.capacities,
                "stats": stats.to_dict(), "parameter_objects": parameter_objects_alive(),
                "seconds": time.perf_counter() - start}
    root = TknpRoot(setup)
    res: dict[str, Any] = {"role": "root", "param_bytes": root.param_bytes, "capacities": root.attn.capacities,
                           "outputs": {}, "history": {}, "reference": {}}
    start = time.perf_counter()
    try:
        for w in workloads:
            engine = root.engine(return_logits=w.return_logits)
            res["outputs"][w.name] = summarize(engine.run(w.requests))
            res["history"][w.name] = [(h.requests, h.new_tokens) for h in engine.history]
    finally:
        root.shutdown()
    res["seconds"] = time.perf_counter() - start
    plain = TokenParallelAttention(root.model.make_kv_cache(reference_rows, setup.max_seq_len), None, root.geometry)
    for w in workloads:
        res["reference"][w.name] = summarize(TknpEngine(root.model, plain, return_logits=w.return_logits)
                                             .run(w.requests))
    if extra is not None:
        res.update(extra(root, workloads))
    res["parameter_objects"] = parameter_objects_alive()
    return res


@dataclass(frozen=True)
class PagedWorkload:
    """Requests for the paged (RadixAttention) check: prompts sharing system prefixes, staggered arrivals."""

    prompts: list[list[int]]
    max_new_tokens: list[int]
    arrival_steps: list[int]


def default_paged_workload() -> PagedWorkload:
    """2 groups x 3 prompts sharing a 24-token system prompt, 2..5 new tokens, arriving over 6 steps."""
    from hybridpar.radix.workload import SharedPrefixWorkload

    reqs = SharedPrefixWorkload(num_groups=2, prompts_per_group=3, system_len=24, question_len=5, output_len=4,
                                seed=3).requests(shuffle=True)
    return PagedWorkload([r.prompt_ids for r in reqs], [2 + i % 4 for i in range(len(reqs))], [0, 0, 1, 2, 4, 5])


def verify_paged_rank(setup: TknpSetup, workload: PagedWorkload, page_size: int = 8) -> dict[str, Any]:
    """Every rank. Roots serve ``workload`` twice with a :class:`~hybridpar.tknp.radix_scheduler.TknpScheduler`
    (all at once, then arriving over time: the second run hits what the first left in each rank's radix
    tree), release the workers, then serve it with a plain TPScheduler (the TP-only reference). Workers
    attend on their paged pool and report their mirror's digest."""
    from hybridpar.radix.scheduler import TPScheduler
    from hybridpar.tknp.radix_scheduler import TknpScheduler
    from hybridpar.tknp.runner import build_paged_worker, build_tknp_scheduler

    def submit(sched: TPScheduler, arrivals: Sequence[int]) -> None:
        for ids, n, a in zip(workload.prompts, workload.max_new_tokens, arrivals):
            sched.add_request(ids, sampling=SamplingParams(max_new_tokens=n, ignore_eos=True), arrival_step=a)

    ensure_groups(setup)
    if not is_tknp_root():
        worker = build_paged_worker(setup, page_size=page_size)
        stats = worker.serve()
        return {"role": "attention", "stats": stats.to_dict(), "digest": worker.pool_digest(),
                "capacity": worker.capacity, "parameter_objects": parameter_objects_alive()}
    sched = build_tknp_scheduler(setup, page_size=page_size, debug_checks=True)
    out: dict[str, Any] = {"role": "root", "capacities": sched.capacities, "pool_tokens": sched.allocator.size}
    try:
        for name, arrivals in (("together", [0] * len(workload.prompts)), ("joining", workload.arrival_steps)):
            submit(sched, arrivals)
            res = sched.process_requests()
            out[name] = {"outputs": [r.output_ids for r in res.values()], "cached": [r.cached_tokens for r in res.values()],
                         "placement": [sched.placement.get(rid) for rid in res]}
        out["digests"] = sched.rank_digests() if sched.is_leader else None
    finally:
        sched.shutdown()
    plain = TPScheduler(sched.wrapper, max_total_tokens=4096, max_running_requests=len(workload.prompts))
    submit(plain, workload.arrival_steps)
    out["reference"] = [r.output_ids for r in plain.process_requests().values()]
    alone = TknpScheduler(sched.wrapper, None, max_total_tokens=4096, max_running_requests=len(workload.prompts))
    submit(alone, workload.arrival_steps)  # token parallelism off: must serve exactly like TPScheduler
    out["fallback"] = [r.output_ids for r in alone.process_requests().values()]
    out["parameter_objects"] = parameter_objects_alive()  # the root's model is still alive here
    return out


def _verify_models(models: Sequence[str], setup: TknpSetup, workloads: Sequence[Workload],
                   paged: PagedWorkload) -> dict[str, Any]:
    return {name: (verify_rank(replace(setup, model_name=name), workloads),
                   verify_paged_rank(replace(setup, model_name=name), paged)) for name in models}


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
    same_tokens_as_tp: bool
    max_diff_tp: float | None  # None for the paged scheduler (it returns tokens only)
    same_tokens_as_hf: bool | None = None
    max_diff_hf: float | None = None


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
                "max_abs_logit_diff_tp": max(r.max_diff_tp for r in self.rows if r.max_diff_tp is not None),
                "max_abs_logit_diff_hf": max(hf) if hf else None, "ranks": self.ranks,
                "seconds": round(self.seconds, 2)}


def logit_error(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> float:
    """fp32: max |difference|; lower precision: max relative L2 error per position (the TP model's criterion)."""
    from hybridpar.models.verify import max_relative_error

    if dtype == torch.float32:
        return float((got.float() - ref.float()).abs().max())
    return max_relative_error(got, ref)


def verify(models: Sequence[str] = DEFAULT_MODELS, tensor_parallel_size: int = 1, token_parallel_size: int = 2,
           backend: str = "auto", compare_hf: bool = True, atol: float = 1e-4, max_seq_len: int = 64,
           timeout: float = 600.0, dtype: str = "float32") -> VerifyResult:
    """Launch ``tp * tknp`` ranks, run TKNP and TP-only, compare (see the module docstring).

    ``atol`` applies in fp32; in bf16/fp16 logits are held to ``LOW_PRECISION_RTOL`` instead.
    """
    from hybridpar.distributed.launcher import resolve_backend
    from hybridpar.models.verify import LOW_PRECISION_RTOL

    setup = TknpSetup(tensor_parallel_size=tensor_parallel_size, token_parallel_size=token_parallel_size,
                      max_seq_len=max_seq_len, max_requests_per_rank=4, dtype=dtype)
    if setup.torch_dtype != torch.float32:
        atol = LOW_PRECISION_RTOL
    workloads, paged = default_workloads(), default_paged_workload()
    backend = resolve_backend(backend, tensor_parallel_size * token_parallel_size)
    check_models(models, tensor_parallel_size)
    start = time.perf_counter()
    per_rank = launch(_verify_models, tensor_parallel_size * token_parallel_size, models, setup, workloads, paged,
                      backend=backend, timeout=timeout)
    result = VerifyResult(True, setup, backend, seconds=time.perf_counter() - start)
    tp = tensor_parallel_size
    for name in models:
        contiguous = [r[name][0] for r in per_rank]
        radix = [r[name][1] for r in per_rank]
        _check_contiguous(result, name, contiguous[:tp], workloads, compare_hf, atol, setup.torch_dtype)
        _check_paged(result, name, radix, paged, tp, compare_hf, setup.torch_dtype)
        for rank, (m, p) in enumerate(zip(contiguous, radix)):
            worker = m["role"] == "attention"
            result.ranks.append({"model": name, "rank": rank, "role": m["role"], "param_bytes": m.get("param_bytes", 0),
                                 "kv_tokens": (m["capacity"] if worker else m["capacities"][0]).num_tokens,
                                 "paged_kv_tokens": p["capacity"].num_tokens if worker else p["pool_tokens"],
                                 "parameter_objects": m["parameter_objects"]})
            result.ok &= not worker or (m["parameter_objects"] == 0 and p["parameter_objects"] == 0)
    return result


def _check_contiguous(result: VerifyResult, name: str, roots: list[dict], workloads: Sequence[Workload],
                      compare_hf: bool, atol: float, dtype: torch.dtype) -> None:
    """TKNP engine vs the TP-only engine on the same roots (tokens + logits), and vs transformers."""
    root = roots[0]
    for w in workloads:
        for other in roots[1:]:  # every root of the TP group produced the same tokens
            result.ok &= [o["tokens"] for o in other["outputs"][w.name]] == [o["tokens"] for o in root["outputs"][w.name]]
        for i, (got, ref, req) in enumerate(zip(root["outputs"][w.name], root["reference"][w.name], w.requests)):
            same = got["tokens"] == ref["tokens"]
            row = CheckRow(name, w.name, i, got["rank"], len(got["tokens"]), same,
                           logit_error(got["logits"], ref["logits"], dtype) if same else float("inf"))
            if compare_hf:
                hf = hf_logits(name, req.prompt_ids, got["tokens"], dtype)
                row.same_tokens_as_hf = hf.argmax(-1).tolist() == got["tokens"]
                row.max_diff_hf = logit_error(got["logits"], hf, dtype)
            result.ok &= row.same_tokens_as_tp and row.max_diff_tp <= atol
            result.ok &= not compare_hf or (row.same_tokens_as_hf and row.max_diff_hf <= atol)
            result.rows.append(row)


def _check_paged(result: VerifyResult, name: str, ranks: list[dict], paged: PagedWorkload, tp: int,
                 compare_hf: bool, dtype: torch.dtype) -> None:
    """TknpScheduler vs TPScheduler (tokens), vs transformers (argmax), and worker mirrors vs root bookkeeping."""
    roots = ranks[:tp]
    leader = roots[0]
    result.ok &= all(r["fallback"] == r["reference"] for r in roots)
    for run in ("together", "joining"):
        result.ok &= all(r[run]["outputs"] == leader["reference"] for r in roots)
        for i, (got, ref, prompt) in enumerate(zip(leader[run]["outputs"], leader["reference"], paged.prompts)):
            row = CheckRow(name, f"radix-{run}", i, leader[run]["placement"][i], len(got), got == ref, None)
            if compare_hf:
                row.same_tokens_as_hf = hf_logits(name, prompt, got, dtype).argmax(-1).tolist() == got
                result.ok &= row.same_tokens_as_hf
            result.rows.append(row)
    for i, r in enumerate(ranks[tp:], start=tp):
        result.ok &= r["digest"] == leader["digests"][i // tp]


def format_result(result: VerifyResult) -> str:
    s = result.setup
    tp_name = "TP 1" if s.tensor_parallel_size == 1 else f"TP {s.tensor_parallel_size}"
    err = "max|dlogit|" if s.torch_dtype == torch.float32 else "max rel err"
    lines = [f"TKNP {s.token_parallel_size} x TP {s.tensor_parallel_size} ({s.dtype}) on {result.backend} versus "
             f"{tp_name} (token parallelism off) and transformers ({s.dtype}, CPU)",
             f"{'model':<12} {'workload':<14} {'req':>3} {'rank':>4} {'tokens':>6} {'same as TP':>10} "
             f"{err + ' TP':>14} {'same as HF':>10} {err + ' HF':>14}"]
    for r in result.rows:
        hf_same = "-" if r.same_tokens_as_hf is None else ("yes" if r.same_tokens_as_hf else "NO")
        hf_diff = "-" if r.max_diff_hf is None else f"{r.max_diff_hf:.2e}"
        tp_diff = "-" if r.max_diff_tp is None else f"{r.max_diff_tp:.2e}"
        lines.append(f"{r.model:<12} {r.workload:<14} {r.request:>3} {r.tknp_rank:>4} {r.tokens:>6} "
                     f"{'yes' if r.same_tokens_as_tp else 'NO':>10} {tp_diff:>14} {hf_same:>10} {hf_diff:>14}")
    lines.append(f"{'model':<12} {'rank':>4} {'role':<10} {'weights (B)':>12} {'KV tokens':>10} {'paged KV':>9} "
                 f"{'nn.Parameters':>13}")
    for r in result.ranks:
        lines.append(f"{r['model']:<12} {r['rank']:>4} {r['role']:<10} {r['param_bytes']:>12,} {r['kv_tokens']:>10,} "
                     f"{r['paged_kv_tokens']:>9,} {r['parameter_objects']:>13}")
    lines.append("OK: token parallelism matches" if result.ok else "FAILED: token parallelism does not match")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridpar.tknp.verify", description=__doc__.split("\n\n")[0])
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
