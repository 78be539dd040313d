"""Token parallelism under torchrun: the same flags as ``python -m hybridpar.tknp.cli``.

    torchrun --nproc-per-node 2 -m hybridpar.demos.tknp_demo \\
        --tensor-parallel-size 1 --token-parallel-size 2 --enable-token-parallel --model-name qwen2-tiny

Every process checks the flags against ``WORLD_SIZE`` and the prompts first (invalid input: one
line from rank 0, exit 2, no rank starts). The ranks are built and serve as the engine's are
(:func:`hybridpar.tknp.runner.demo_rank`). Outside torchrun (``hybridpar demo tknp_demo ...``) the
ranks are spawned with ``hybridpar.launch`` instead. Rank 0 prints what ran and what to look for, the per-rank table (weights, KV cache,
tokens attended), the completions as text and a one-line verdict (:func:`format_explained`, also
usable on the result of ``hybridpar.tknp.cli.run_demo`` in a notebook).
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import torch.distributed as dist

from hybridpar.distributed.launcher import is_torchrun, run_torchrun
from hybridpar.config import config_error
from hybridpar.tknp.cli import (
    CONFIG_ERRORS,
    DEFAULT_PROMPTS,
    DemoResult,
    attended_tokens,
    check_requests,
    collect,
    demo_rank,
    format_reports,
    load_tokenizer,
    make_requests,
    parse_args,
    run_demo,
)
from hybridpar.tknp.runner import RankReport, TknpSetup


def tknp_verdict(result: DemoResult) -> str:
    """One sentence on what the per-rank table shows, checked against what the layout promises."""
    from hybridpar.demos.explain import binary_bytes

    s, reports = result.setup, result.reports
    roots = [r for r in reports if r.role == "root"]
    workers = [r for r in reports if r.role == "attention"]
    idle = [r.rank for r in reports if attended_tokens(r) == 0]
    attended = ", ".join(f"rank {r.rank} {attended_tokens(r)}" for r in reports)
    if s.token_parallel_size > 1:
        problems = [f"rank {r.rank} holds {r.param_bytes} bytes of weights" for r in workers if r.param_bytes]
        problems += [f"rank {rank} attended no token" for rank in idle]
        if problems:
            return "UNEXPECTED: " + "; ".join(problems) + "."
        ratio = min(w.capacity.num_tokens for w in workers) / max(1, max(r.capacity.num_tokens for r in roots))
        who = "the attention rank holds" if len(workers) == 1 else f"the {len(workers)} attention ranks hold"
        kv = (f"{ratio:.1f}x the KV capacity of a root" if s.memory_budget_bytes is not None else
              "with no --memory-budget-mb the same KV pool as a root (a budget gives them the memory a root "
              "spends on weights)")
        return (f"token parallelism at work: {who} no weights (0 B, 0 nn.Parameter objects) and {kv}; a root holds "
                f"{binary_bytes(roots[0].param_bytes)} of weights; every rank attended new tokens ({attended}). "
                f"`python -m hybridpar.tknp.verify` checks that the tokens equal TP alone and transformers'.")
    if s.data_parallel_size > 1:
        return (f"data parallelism: each of the {s.data_parallel_size} replicas holds all "
                f"{binary_bytes(roots[0].param_bytes)} of weights and serves its own share of the prompts "
                f"({attended} new tokens attended); token parallelism (--token-parallel-size) would keep one copy "
                f"of the weights and give the other ranks' memory to the KV cache.")
    return (f"TP {s.tensor_parallel_size} alone: each rank holds {binary_bytes(roots[0].param_bytes)} of weights "
            f"and attends for every request ({attended} new tokens).")


def format_explained(result: DemoResult) -> str:
    """What ran and what to look for, the per-rank table, the completions as text, and the verdict."""
    from hybridpar.demos.explain import intro, model_line, one_line, verdict

    s = result.setup
    layout = f"TP {s.tensor_parallel_size} x TKNP {s.token_parallel_size} x DP {s.data_parallel_size}"
    ranks = s.tensor_parallel_size * s.token_parallel_size * s.data_parallel_size
    ran = [model_line(s.model_name),
           f"{layout} on {ranks} rank{'s' if ranks > 1 else ''}, {s.dtype}, greedy: {len(result.prompts)} prompts served together"]
    if s.token_parallel_size > 1:
        look = ["role 'root': the ranks of TKNP index 0 hold the weights, compute Q, K and V for the whole "
                "batch and scatter them; role 'attention': ranks that hold only KV cache and attend for the "
                "requests placed on them",
                "weights (B) and nn.Params: 0 on the attention ranks; KV tokens: " +
                ("more there than on a root, from the same memory budget" if s.memory_budget_bytes is not None else
                 "the same pool everywhere, 8 requests of --max-seq-len tokens (--memory-budget-mb sizes each "
                 "rank's pool from what its weights leave)"),
                "attended: the new tokens each rank ran attention for (roots attend for their own requests too)",
                "[tknp rank k]: where each prompt's KV cache lived"]
    else:
        look = ["every rank holds weights (a replica, or a TP shard of them) and KV cache",
                "attended: the new tokens each rank ran attention for",
                "[replica k]: which replica served each prompt"]
    where = "tknp rank" if s.token_parallel_size > 1 else "replica"
    body = [f"[{where} {r}] {p} -> {one_line(c)}" for p, c, r in zip(result.prompts, result.completions,
                                                                       result.placement)]
    return "\n".join([intro("Token parallelism", ran, look), format_reports(result.reports), *body,
                      verdict(tknp_verdict(result))])


def _rank_main(setup: TknpSetup, per_replica: list) -> list[RankReport] | None:
    report = demo_rank(setup, per_replica)
    reports = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(report, reports, dst=0)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    torchrun = is_torchrun()
    prog = "torchrun ... -m hybridpar.demos.tknp_demo" if torchrun else "hybridpar demo tknp_demo"
    args, setup = parse_args(argv, world_size=int(os.environ["WORLD_SIZE"]) if torchrun else None, prog=prog)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prompts = list(args.prompts or DEFAULT_PROMPTS)
    try:
        if torchrun:
            tokenizer = load_tokenizer(setup)
            requests = make_requests([list(tokenizer(p).input_ids) for p in prompts], args.max_new_tokens)
            check_requests(setup, requests)
        else:  # spawn the ranks (hybridpar.launch); run_demo checks the prompts before it does
            result: DemoResult | None = run_demo(
                setup.model_name, setup.tensor_parallel_size, setup.token_parallel_size, args.enable_token_parallel,
                setup.data_parallel_size, prompts, args.max_new_tokens, setup.memory_budget_bytes, setup.max_seq_len,
                setup.dtype, args.force_cpu)
    except CONFIG_ERRORS as exc:
        config_error(prog, exc)
    if torchrun:
        reports = run_torchrun(_rank_main, setup, requests.split(setup.data_parallel_size))
        result = None if reports is None else collect(setup, reports, prompts, tokenizer)
    if result is not None:
        print(format_explained(result))
        if args.json:
            print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
