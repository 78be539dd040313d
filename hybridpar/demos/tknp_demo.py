"""Token parallelism under torchrun: the same flags as ``python -m hybridpar.tknp.cli``.

    torchrun --nproc-per-node 2 -m hybridpar.demos.tknp_demo \\
        --tensor-parallel-size 1 --token-parallel-size 2 --enable-token-parallel --model-name qwen2-tiny

Every process checks the flags against ``WORLD_SIZE`` first (invalid input: message, exit 2, no
rank starts). Rank 0 prints the per-rank table (weights, KV cache) and the completions.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import torch.distributed as dist

from hybridpar.distributed.launcher import run_torchrun
from hybridpar.tknp.cli import (
    DEFAULT_PROMPTS,
    collect,
    demo_rank,
    format_demo,
    load_tokenizer,
    make_requests,
    parse_args,
    split_for_replicas,
)
from hybridpar.tknp.runner import RankReport, TknpSetup


def _rank_main(setup: TknpSetup, per_replica: list) -> list[RankReport] | None:
    report = demo_rank(setup, per_replica)
    reports = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(report, reports, dst=0)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args, setup = parse_args(argv, world_size=world, prog="torchrun ... -m hybridpar.demos.tknp_demo")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(setup)
    prompts = list(args.prompts or DEFAULT_PROMPTS)
    requests = make_requests([list(tokenizer(p).input_ids) for p in prompts], args.max_new_tokens)
    reports = run_torchrun(_rank_main, setup, split_for_replicas(requests, setup.data_parallel_size))
    if reports is not None:
        result = collect(setup, reports, prompts, tokenizer)
        print(format_demo(result))
        if args.json:
            print(json.dumps(result.to_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
