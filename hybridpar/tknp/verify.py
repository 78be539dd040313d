"""Correctness of token parallelism: TKNP against TP-only (TP 1 when tp=1) and transformers.

    python -m hybridpar.tknp.verify --token-parallel-size 2                 # 2 ranks, NCCL if 2 GPUs
    python -m hybridpar.tknp.verify --tensor-parallel-size 2 --token-parallel-size 2 --backend gloo

Every rank is started by ``hybridpar.launch``. The roots serve two workloads with token
parallelism (a batch of prompts of different lengths, and requests that join and finish
mid-run), release the workers, then serve the same workloads again with token parallelism
disabled (one local cache, fewer rows, so some requests wait): the TP-only reference. The
parent compares tokens and logits of the two, and with transformers' model on the same
checkpoint (fp32, CPU), then prints a table and one JSON line (``{"ok": ..., ...}``). Exit
status 0 when everything matches.
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


def _verify_models(models: Sequence[str], setup: TknpSetup, workloads: Sequence[Workload]) -> dict[str, Any]:
    return {name: verify_rank(replace(setup, model_name=name), workloads) for name in models}


@functools.cache
def _hf_model(model_name: str | None) -> Any:
    from transformers import AutoModelForCausalLM

    from hybridpar.models.default_checkpoint import resolve_model

    return AutoModelForCausalLM.from_pretrained(str(resolve_model(model_name)), dtype=torch.float32).eval()


def hf_logits(model_name: str | None, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """transformers' fp32 CPU logits at the positions where each of ``tokens`` was chosen."""
    with torch.no_grad():
        logits = _hf_model(model_name)(torch.tensor([prompt + tokens])).logits[0]
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
    max_diff_tp: float
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
        return {"ok": self.ok, "tensor_parallel_size": self.setup.tensor_parallel_size,
                "token_parallel_size": self.setup.token_parallel_size, "backend": self.backend,
                "requests": len(self.rows), "tokens_identical": all(r.same_tokens_as_tp for r in self.rows),
                "max_abs_logit_diff_tp": max(r.max_diff_tp for r in self.rows),
                "max_abs_logit_diff_hf": max(hf) if hf else None, "ranks": self.ranks,
                "seconds": round(self.seconds, 2)}


def verify(models: Sequence[str] = DEFAULT_MODELS, tensor_parallel_size: int = 1, token_parallel_size: int = 2,
           backend: str = "auto", compare_hf: bool = True, atol: float = 1e-4, max_seq_len: int = 64,
           timeout: float = 600.0) -> VerifyResult:
    """Launch ``tp * tknp`` ranks, run TKNP and TP-only, compare (see the module docstring)."""
    from hybridpar.distributed.launcher import resolve_backend

    setup = TknpSetup(tensor_parallel_size=tensor_parallel_size, token_parallel_size=token_parallel_size,
                      max_seq_len=max_seq_len)
    workloads = default_workloads()
    backend = resolve_backend(backend, tensor_parallel_size * token_parallel_size)
    check_models(models, tensor_parallel_size)
    start = time.perf_counter()
    per_rank = launch(_verify_models, tensor_parallel_size * token_parallel_size, models, setup, workloads,
                      backend=backend, timeout=timeout)
    result = VerifyResult(True, setup, backend, seconds=time.perf_counter() - start)
    roots = per_rank[:tensor_parallel_size]
    for name in models:
        root = roots[0][name]
        for rank, r in enumerate(per_rank):
            m = r[name]
            result.ranks.append({"model": name, "rank": rank, "role": m["role"],
                                 "param_bytes": m.get("param_bytes", 0),
                                 "kv_tokens": (m["capacities"][0] if m["role"] == "root" else m["capacity"]).num_tokens,
                                 "parameter_objects": m["parameter_objects"]})
            if m["role"] == "attention" and m["parameter_objects"] != 0:
                result.ok = False
        for w in workloads:
            for other in roots[1:]:  # every root of the TP group produced the same tokens
                result.ok &= [o["tokens"] for o in other[name]["outputs"][w.name]] == \
                             [o["tokens"] for o in root["outputs"][w.name]]
            for i, (got, ref, req) in enumerate(zip(root["outputs"][w.name], root["reference"][w.name], w.requests)):
                row = CheckRow(name, w.name, i, got["rank"], len(got["tokens"]), got["tokens"] == ref["tokens"],
                               float((got["logits"] - ref["logits"]).abs().max()) if got["tokens"] == ref["tokens"]
                               else float("inf"))
                if compare_hf:
                    hf = hf_logits(name, req.prompt_ids, got["tokens"])
                    row.same_tokens_as_hf = hf.argmax(-1).tolist() == got["tokens"]
                    row.max_diff_hf = float((got["logits"] - hf).abs().max())
                result.ok &= row.same_tokens_as_tp and row.max_diff_tp <= atol
                result.ok &= compare_hf is False or (row.same_tokens_as_hf and row.max_diff_hf <= atol)
                result.rows.append(row)
    return result


def format_result(result: VerifyResult) -> str:
    s = result.setup
    tp_name = "TP 1" if s.tensor_parallel_size == 1 else f"TP {s.tensor_parallel_size}"
    lines = [f"TKNP {s.token_parallel_size} x TP {s.tensor_parallel_size} on {result.backend} versus {tp_name} "
             f"(token parallelism off) and transformers",
             f"{'model':<12} {'workload':<8} {'req':>3} {'rank':>4} {'tokens':>6} {'same as TP':>10} "
             f"{'max|dlogit| TP':>14} {'same as HF':>10} {'max|dlogit| HF':>14}"]
    for r in result.rows:
        hf_same = "-" if r.same_tokens_as_hf is None else ("yes" if r.same_tokens_as_hf else "NO")
        hf_diff = "-" if r.max_diff_hf is None else f"{r.max_diff_hf:.2e}"
        lines.append(f"{r.model:<12} {r.workload:<8} {r.request:>3} {r.tknp_rank:>4} {r.tokens:>6} "
                     f"{'yes' if r.same_tokens_as_tp else 'NO':>10} {r.max_diff_tp:>14.2e} {hf_same:>10} {hf_diff:>14}")
    lines.append(f"{'model':<12} {'rank':>4} {'role':<10} {'weights (B)':>12} {'KV tokens':>10} {'nn.Parameters':>13}")
    for r in result.ranks:
        lines.append(f"{r['model']:<12} {r['rank']:>4} {r['role']:<10} {r['param_bytes']:>12,} {r['kv_tokens']:>10,} "
                     f"{r['parameter_objects']:>13}")
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
    parser.add_argument("--atol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hybridpar.config import ParallelConfig, ParallelConfigError

    try:
        ParallelConfig(tensor_parallel_size=args.tensor_parallel_size,
                       token_parallel_size=args.token_parallel_size).validate()
        if args.token_parallel_size < 2:
            raise ParallelConfigError("verify compares token parallelism with TP only: --token-parallel-size >= 2")
        check_models(args.models or DEFAULT_MODELS, args.tensor_parallel_size)
    except (ParallelConfigError, FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    result = verify(args.models or DEFAULT_MODELS, args.tensor_parallel_size, args.token_parallel_size,
                    args.backend, compare_hf=not args.no_hf, atol=args.atol)
    print(format_result(result))
    print(json.dumps(result.summary()))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
