"""``hybridpar``: one command with subcommands (``python -m hybridpar`` is the same).

::

    hybridpar generate --tensor-parallel-size 2 --prompt "The radix cache"        # spawns 2 ranks (LLM)
    hybridpar serve --tensor-parallel-size 2 --port 8000                          # OpenAI-compatible server
    torchrun --nproc-per-node 4 -m hybridpar generate --tensor-parallel-size 2 \\
        --token-parallel-size 2 --enable-token-parallel                          # one rank per process
    hybridpar verify model --tp 2          # the TP model against transformers
    hybridpar verify tknp --token-parallel-size 2
    hybridpar demo tp_layers --tp 2        # any module of hybridpar.demos

Errors. A configuration error is one line on stderr, ``hybridpar: error: <what to change>``, with
exit status 2, printed once: under torchrun by rank 0, while the other ranks exit quietly (were
they to fail first, torchrun would kill rank 0 before it could print). ``--debug`` shows the traceback.
Real faults (a rank that crashes) keep their traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Sequence

from hybridpar.config import EXECUTOR_BACKENDS, RAY_PLACEMENTS, ArgumentParser, ParallelConfigError, config_error

DEMOS = ("tp_layers", "tp_block", "tp_generate", "tp_anatomy", "radix_demo", "radix_tp_trace", "tknp_demo")
CONFIG_ERRORS = (ParallelConfigError, ValueError, FileNotFoundError)
DEFAULT_PROMPTS = ["Tensor parallelism splits", "The radix cache", "A token-parallel group"]


def _engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine's flags, shared by ``generate`` and ``serve`` (vLLM's names)."""
    p.add_argument("--model", "--model-name", dest="model", default=None,
                   help="built-in name, checkpoint directory or hub id (default: the built-in hybridpar/qwen2-tiny)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--token-parallel-size", type=int, default=1)
    p.add_argument("--enable-token-parallel", action="store_true", default=None)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    add_executor_arguments(p)
    p.add_argument("--force-cpu", action="store_true", help="gloo on the CPU even where GPUs are present")
    p.add_argument("--dtype", default="auto", help="auto (fp32), fp32, bf16 or fp16")
    p.add_argument("--no-prefix-caching", action="store_true", help="turn the radix cache off")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + output tokens of one request")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests running at once per KV pool")
    p.add_argument("--debug-checks", action="store_true", help="check the radix cache's invariants after every step")
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps (GPU)")
    p.add_argument("--attention-backend", default=None, choices=["torch_native", "triton"],
                   help="decode attention inside CUDA graphs (default: triton on a GPU, torch_native on the CPU)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE models: whole experts per rank over the EP group (TP, or TP x TKNP)")


def _engine_args(args: argparse.Namespace) -> dict:
    if args.force_cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch looks at the GPUs
    return dict(model=args.model, tensor_parallel_size=args.tensor_parallel_size,
                token_parallel_size=args.token_parallel_size, enable_token_parallel=args.enable_token_parallel,
                data_parallel_size=args.data_parallel_size, dtype=args.dtype,
                enable_prefix_caching=not args.no_prefix_caching, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, debug_checks=args.debug_checks, enforce_eager=args.enforce_eager,
                backend="gloo" if args.force_cpu else "auto", ray_placement=args.ray_placement,
                attention_backend=args.attention_backend, enable_expert_parallel=args.enable_expert_parallel)


def _generate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text with the engine (LLM) in any layout")
    _engine_flags(p)
    p.add_argument("--prompt", action="append", dest="prompts", help="repeat for several prompts")
    p.add_argument("--max-tokens", "--max-new-tokens", dest="max_tokens", type=int, default=24)
    p.add_argument("--temperature", type=float, default=0.0)


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn)")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="the same as --model")
    _engine_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("HYBRIDPAR_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every route but /health (env HYBRIDPAR_API_KEY)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: MODEL)")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds that requests in flight get to finish after SIGTERM")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """Where the engine's ranks come from (``generate`` and ``serve``)."""
    p.add_argument("--distributed-executor-backend", default=None, choices=EXECUTOR_BACKENDS,
                   help="mp: spawn the ranks here (the default); ray: one Ray actor per rank on a Ray cluster; "
                        "torchrun (or external_launcher): this process is a torchrun rank (the default under torchrun)")
    p.add_argument("--ray-placement", default="pack", choices=sorted(RAY_PLACEMENTS),
                   help="with ray: " + "; ".join(f"{k}: {v}" for k, v in RAY_PLACEMENTS.items()))


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="hybridpar", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks of configuration errors")
    sub = parser.add_subparsers(dest="command", required=True)
    _generate_parser(sub)
    _serve_parser(sub)
    v = sub.add_parser("verify", help="check a model or token parallelism against a reference")
    v.add_argument("what", choices=["model", "tknp"], help="model: TP vs transformers; tknp: TKNP vs TP")
    d = sub.add_parser("demo", help="run one of the course's demos")
    d.add_argument("name", choices=DEMOS)
    return parser


def _run_generate(args: argparse.Namespace) -> int:
    from hybridpar.distributed.launcher import is_torchrun
    from hybridpar.engine.llm import LLM
    from hybridpar.core import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
    executor = args.distributed_executor_backend or ("external_launcher" if is_torchrun() else "mp")
    with LLM(**_engine_args(args), distributed_executor_backend=executor) as llm:
        outputs = llm.generate(args.prompts or DEFAULT_PROMPTS, params, use_tqdm=False)
    if int(os.environ.get("RANK", "0")) == 0:
        c = llm.config
        layout = (f"TP {c.tensor_parallel_size} x TKNP {c.token_parallel_size}" if c.token_parallel
                  else f"TP {c.tensor_parallel_size} x DP {c.data_parallel_size}")
        print(f"{c.model or 'hybridpar/qwen2-tiny'} on {c.world_size} rank(s) ({layout}, {executor}), "
              f"{'greedy' if params.temperature == 0 else f'temperature {params.temperature}'}:")
        for out in outputs:
            print(f"  {out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason}, "
                  f"{out.num_cached_tokens} prompt tokens from the radix cache)")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    from hybridpar.distributed.launcher import is_torchrun
    from hybridpar.serving.api_server import run_server

    if is_torchrun() or args.distributed_executor_backend in ("torchrun", "external_launcher"):
        raise ValueError("hybridpar serve starts its own ranks (--distributed-executor-backend mp or ray); run it "
                         "without torchrun")
    if args.model_tag is not None:
        if args.model is not None and args.model != args.model_tag:
            raise ValueError(f"the model is given twice ({args.model_tag!r} and --model {args.model!r}); give one")
        args.model = args.model_tag
    engine_args = dict(_engine_args(args), distributed_executor_backend=args.distributed_executor_backend or "mp")
    return run_server(engine_args, args.host, args.port, args.api_key, args.served_model_name, args.drain_timeout,
                      args.log_level)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    try:
        if args.command == "generate":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            return _run_generate(args)
        if args.command == "serve":
            if rest:
                parser.error(f"unrecognized arguments: {' '.join(rest)}")
            return _run_serve(args)
        if args.command == "verify":
            module = "hybridpar.models.verify" if args.what == "model" else "hybridpar.tknp.verify"
        else:
            module = f"hybridpar.demos.{args.name}"
        return int(importlib.import_module(module).main(rest) or 0)
    except CONFIG_ERRORS as exc:
        if args.debug:
            traceback.print_exc()
        config_error("hybridpar", exc)


if __name__ == "__main__":
    raise SystemExit(main())
