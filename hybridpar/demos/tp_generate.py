"""Demo: generate text with a tensor-parallel model; rank 0 prints it.

Under torchrun (one process per rank)::

    torchrun --nproc_per_node=2 -m hybridpar.demos.tp_generate [--force-cpu] [--model-name NAME]

From a plain shell or a notebook (spawns the ranks with :func:`hybridpar.launch`)::

    python -m hybridpar.demos.tp_generate --tp 2
    from hybridpar.demos.tp_generate import run_demo
    run_demo(tp_size=2)

The model defaults to the built-in ``hybridpar/qwen2-tiny``, a 2.9M-parameter Qwen2 trained on this
course's text: it continues a prompt with sentences from the book, and every rank produces the same
tokens as transformers would. ``--model-name`` takes another built-in (``llama-tiny``,
``qwen2.5-0.5b-shape``, ...), a local checkpoint directory or a hub id. The output says what ran, what to
look for, and ends with a one-line verdict; every rank checks that all ranks generated the same tokens.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from hybridpar.config import ArgumentParser

DEFAULT_PROMPTS = ("Tensor parallelism splits", "A radix tree", "The capital of France is")


def demo_worker(tp_size: int, model_name: str | None, prompts: list[str], max_new_tokens: int, dtype: str,
                temperature: float, top_k: int, top_p: float, seed: int) -> list[dict[str, Any]]:
    """Runs in every rank: initialise TP, load this rank's shards, generate. Every rank returns the results."""
    import torch.distributed as dist

    from hybridpar.distributed.parallel_state import initialize_tensor_parallel
    from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper
    from hybridpar.models.sampling import SamplingParams

    initialize_tensor_parallel(tp_size)
    wrapper = TPRadixAttentionModelWrapper(model_name, dtype=dtype)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed)
    outputs = wrapper.generate_ids([wrapper.encode(p) for p in prompts], params)
    mine = [o.token_ids for o in outputs]
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)  # TP rank 0 chose every token: all ranks must hold the same ones
    agree = all(tokens == mine for tokens in everyone)
    return [{"prompt": p, "text": wrapper.decode(o.token_ids), "token_ids": o.token_ids,
             "finish_reason": o.finish_reason, "ranks": len(everyone), "same_on_all_ranks": agree}
            for p, o in zip(prompts, outputs)]


def _check(tp_size: int, model_name: str | None) -> str:
    """Resolve the model and check that ``tp_size`` fits it (raises before any process starts)."""
    from hybridpar.models.config import ModelConfig, check_tp_size
    from hybridpar.models.default_checkpoint import resolve_model

    path = resolve_model(model_name)
    check_tp_size(ModelConfig.from_pretrained(path), tp_size)
    return str(path)


def run_demo(tp_size: int = 2, model_name: str | None = None, prompts: Sequence[str] = DEFAULT_PROMPTS,
             max_new_tokens: int = 24, backend: str = "auto", dtype: str = "fp32", temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> list[dict[str, Any]]:
    """Launch ``tp_size`` ranks with :func:`hybridpar.launch`; return rank 0's results (one dict per prompt).

    Rank results are identical by construction (tokens are chosen on TP rank 0 and broadcast).
    """
    from hybridpar.distributed.launcher import launch

    path = _check(tp_size, model_name)
    results = launch(demo_worker, tp_size, tp_size, path, list(prompts), max_new_tokens, dtype, temperature, top_k,
                     top_p, seed, backend=backend, timeout=600.0)
    return results[0]


def format_results(results: list[dict[str, Any]]) -> str:
    """One line per prompt: the prompt (quoted), its completion as text on one line, why it stopped."""
    from hybridpar.demos.explain import one_line

    return "\n".join(f"{r['prompt']!r} -> {one_line(r['text'])}  [{r['finish_reason']}]" for r in results)


def format_report(results: list[dict[str, Any]], model_name: str | None, tp: int, backend: str, dtype: str,
                  temperature: float = 0.0, max_new_tokens: int = 24) -> str:
    """What ran, what to look for, the completions (:func:`format_results`) and a one-line verdict."""
    from hybridpar.demos.explain import intro, model_kind, model_line, verdict

    kind = model_kind(model_name)
    how = "greedy" if temperature == 0 else f"sampled at temperature {temperature:g}"
    look = ["every completion continues its prompt: this model learned the book by heart, so it writes "
            "sentences from the course, also after a prompt from elsewhere (like 'The capital of France is')"
            if kind == "trained" else "this model has random weights: its text is noise by design, so judge "
            "the run by the verdict, not by the words" if kind == "random" else
            "every completion continues its prompt",
            "the same tokens on every rank: TP rank 0 picks each token from the gathered logits and "
            "broadcasts it, so the text does not depend on the TP size"]
    head = intro("Tensor-parallel generation",
                 [model_line(model_name), f"TP {tp} on {backend}, {dtype}, {how}, up to {max_new_tokens} new "
                                          f"tokens per prompt"], look)
    ranks = results[0]["ranks"] if results else tp
    n = f"{len(results)} completion{'' if len(results) == 1 else 's'}"
    if not all(r["same_on_all_ranks"] for r in results):
        end = f"MISMATCH: the {ranks} ranks generated different tokens: a bug in the TP model or in sampling."
    elif kind == "trained":
        end = (f"{n}, identical on all {ranks} ranks, in the book's English: the sharded weights "
               f"were loaded and combined correctly (`python -m hybridpar.models.verify` compares the logits "
               f"with transformers').")
    else:
        end = (f"{n}, identical on all {ranks} ranks. Whether they are right is for "
               f"`python -m hybridpar.models.verify --model-name ...` to say: it compares the logits with "
               f"transformers'.")
    return "\n".join([head, format_results(results), verdict(end)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description="Generate text with a tensor-parallel model.")
    parser.add_argument("--model-name", default=None, help="built-in name, local directory or hub id "
                                                           "(default: built-in hybridpar/qwen2-tiny)")
    parser.add_argument("--force-cpu", action="store_true", help="use gloo on the CPU even if GPUs are visible")
    parser.add_argument("--tp", type=int, default=None, help="TP size (default: WORLD_SIZE under torchrun, else 2)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("prompts", nargs="*", default=list(DEFAULT_PROMPTS))
    args = parser.parse_args(argv)
    if args.force_cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before anything initialises CUDA
    from hybridpar.distributed.launcher import is_torchrun, run_torchrun

    sampling = (args.max_new_tokens, args.dtype, args.temperature, args.top_k, args.top_p, args.seed)
    if is_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        tp = args.tp or world
        if world % tp:
            raise SystemExit(f"--tp {tp} must divide the torchrun world size {world}")
        path = _check(tp, args.model_name)
        results = run_torchrun(demo_worker, tp, path, args.prompts, *sampling)
        if int(os.environ["RANK"]) == 0:
            print(format_report(results, args.model_name, tp, _backend_name("auto", tp), args.dtype, args.temperature,
                                args.max_new_tokens), flush=True)
        return 0
    backend = "gloo" if args.force_cpu else "auto"
    results = run_demo(args.tp or 2, args.model_name, args.prompts, *sampling[:1],
                       backend=backend, dtype=args.dtype, temperature=args.temperature,
                       top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    print(format_report(results, args.model_name, args.tp or 2, _backend_name(backend, args.tp or 2), args.dtype,
                        args.temperature, args.max_new_tokens), flush=True)
    return 0


def _backend_name(backend: str, nprocs: int) -> str:
    from hybridpar.distributed.launcher import resolve_backend

    name = resolve_backend(backend, nprocs)
    return "gloo (CPU)" if name == "gloo" else "NCCL (GPU)"


if __name__ == "__main__":
    sys.exit(main())
