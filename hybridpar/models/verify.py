"""Does the tensor-parallel model compute what transformers computes? A check you can run anywhere.

    python -m hybridpar.models.verify --tp 2 --dtype bf16 --backend nccl      # 2 GPUs
    python -m hybridpar.models.verify --tp 2 --dtype fp32 --backend gloo      # CPU

1. In this process, transformers' own ``AutoModelForCausalLM`` loads the same
   checkpoint, generates ``max_new_tokens`` greedy tokens per prompt, and scores prompt +
   continuation in one forward pass: the reference logits.
2. ``tp`` ranks load the checkpoint sharded and (a) recompute those logits the way serving does
   (ragged prefill of all prompts, then one batched decode step per continuation token, fed the
   reference tokens), (b) generate greedily, all prompts in one batch, through the fast decode path
   (:mod:`hybridpar.models.cuda_graph`: on a GPU CUDA graphs, Triton decode attention and the fused
   element-wise kernels of :mod:`hybridpar.models.fused_ops`, which (a) also uses).
3. Compare. fp32: max |logit difference| <= 1e-4 over prefill and every decode step, and all greedy
   tokens identical (eager attention reference). bf16/fp16 (reference in the same dtype, SDPA
   attention, see :func:`_load_hf`): relative logit error
   ``max ||ours - ref|| / ||ref||`` per position <= 2e-2, and greedy tokens identical for at least
   the first 16 tokens of every prompt.

Prints a table and one JSON line (prefixed ``VERIFY_JSON``); exits non-zero on failure.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from hybridpar.config import ArgumentParser, config_error

DEFAULT_PROMPTS = ("The capital of France is", "def fibonacci(n):", "Tensor parallelism splits every weight matrix",
                   "1, 2, 3,")
FP32_ATOL = 1e-4
LOW_PRECISION_RTOL = 2e-2
LOW_PRECISION_MIN_MATCH = 16


@dataclass
class Reference:
    prompts: list[list[int]]
    continuations: list[list[int]]  # greedy tokens of the reference model
    logits: list[torch.Tensor]  # per prompt [len(prompt) + len(continuation), V], float32 CPU


@dataclass
class VerifyResult:
    model: str
    architecture: str
    tp: int
    dtype: str
    backend: str
    load_format: str
    prefill_max_abs: float
    decode_max_abs: float
    max_rel_err: float
    greedy_match: int  # tokens identical to the reference, minimum over prompts
    max_new_tokens: int
    passed: bool
    criterion: str


def _load_hf(path: Path, dtype: torch.dtype, device: torch.device):
    """transformers' model: eager attention in fp32; SDPA (transformers' default) in bf16/fp16.

    Eager attention rounds the scores ``q k^T`` to bf16 before the softmax (about 0.4% of a score of
    10 shifts a probability by 4%); SDPA kernels, like hybridpar's backend, keep them in fp32. In low
    precision SDPA is therefore the like-for-like reference; in fp32 both agree to ~1e-6.
    """
    import transformers
    from transformers import AutoModelForCausalLM

    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    attn = "eager" if dtype == torch.float32 else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation=attn, trust_remote_code=False,
                                                 use_safetensors=True, **{dtype_kw: dtype})
    return model.to(device).eval()


@torch.no_grad()
def hf_reference(path: str | Path, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Reference:
    """Greedy continuations (ignoring EOS) and full-sequence logits from transformers' own model."""
    device = torch.device(device)
    model = _load_hf(Path(path), dtype, device)
    # transformers 5.2x renamed forward's ``past_key_values`` to ``cache`` (the old name warns)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    continuations, logits = [], []
    for prompt in prompts:
        out = model(torch.tensor([list(prompt)], device=device), use_cache=True)
        tokens = []
        for _ in range(max_new_tokens):
            tokens.append(int(out.logits[0, -1].argmax()))
            past = getattr(out, "cache", None)
            cache = {cache_kw: out.past_key_values if past is None else past}
            out = model(torch.tensor([[tokens[-1]]], device=device), use_cache=True, **cache)
        continuations.append(tokens)
        full = model(torch.tensor([list(prompt) + tokens], device=device)).logits[0]
        logits.append(full.float().cpu())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Reference([list(p) for p in prompts], continuations, logits)


def model_checks(path: str, prompts: list[list[int]], continuations: list[list[int]], max_new_tokens: int,
                 dtype: str = "fp32", load_format: str = "sharded") -> dict[str, Any]:
    """Runs in every rank of an initialised TP group: load, score the continuations, generate greedily.

    Returns ``{"load_stats", "logits", "tokens"}`` on TP rank 0 and ``{"load_stats"}`` elsewhere.
    """
    from hybridpar.models.generate import generate, teacher_forced_logits
    from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper
    from hybridpar.core import SamplingParams

    wrapper = TPRadixAttentionModelWrapper(path, dtype=dtype, load_format=load_format)
    logits = teacher_forced_logits(wrapper.model, prompts, continuations)
    # greedy tokens through the serving decode path (on a GPU: CUDA graphs, Triton attention, fused kernels)
    outs = generate(wrapper.model, prompts, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
                    use_cuda_graph=True)
    result: dict[str, Any] = {"load_stats": wrapper.load_stats.to_dict()}
    if wrapper.tp_group.is_first_rank:
        result.update(logits=logits, tokens=[o.token_ids for o in outs])
    return result


def verify_worker(tp: int, path: str, prompts: list[list[int]], continuations: list[list[int]],
                  max_new_tokens: int, dtype: str, load_format: str) -> dict[str, Any]:
    from hybridpar.distributed.parallel_state import initialize_tensor_parallel

    initialize_tensor_parallel(tp)
    return model_checks(path, prompts, continuations, max_new_tokens, dtype, load_format)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def max_relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``max ||ours - ref|| / ||ref||`` over positions (rows): the low-precision criterion."""
    diff = ours.float() - ref.float()
    return (diff.norm(dim=-1) / ref.float().norm(dim=-1).clamp_min(1e-12)).max().item()


def compare(ref: Reference, logits: list[torch.Tensor], tokens: list[list[int]]) -> dict[str, float]:
    """Max abs difference (prefill rows, decode rows), max per-position relative L2 error, greedy match."""
    prefill, decode, rel = 0.0, 0.0, 0.0
    for prompt, mine, theirs in zip(ref.prompts, logits, ref.logits):
        diff = (mine.float() - theirs.float())
        p = len(prompt)
        prefill = max(prefill, diff[:p].abs().max().item())
        if diff.shape[0] > p:
            decode = max(decode, diff[p:].abs().max().item())
        rel = max(rel, max_relative_error(mine, theirs))
    match = min(common_prefix(t, c) for t, c in zip(tokens, ref.continuations))
    return {"prefill_max_abs": prefill, "decode_max_abs": decode, "max_rel_err": rel, "greedy_match": match}


def judge(metrics: dict[str, float], dtype: torch.dtype, max_new_tokens: int) -> tuple[bool, str]:
    if dtype == torch.float32:
        ok = max(metrics["prefill_max_abs"], metrics["decode_max_abs"]) <= FP32_ATOL \
            and metrics["greedy_match"] == max_new_tokens
        return ok, f"max abs diff <= {FP32_ATOL:g} and all {max_new_tokens} greedy tokens identical"
    need = min(LOW_PRECISION_MIN_MATCH, max_new_tokens)
    ok = metrics["max_rel_err"] <= LOW_PRECISION_RTOL and metrics["greedy_match"] >= need
    return ok, f"relative logit error <= {LOW_PRECISION_RTOL:g} and first {need} greedy tokens identical"


def verify(tp: int = 2, dtype: str = "fp32", backend: str = "auto", model_name: str | None = None,
           max_new_tokens: int = 32, prompts: Sequence[str] = DEFAULT_PROMPTS, load_format: str = "sharded",
           timeout: float = 600.0) -> VerifyResult:
    """Run the whole check (reference here, ``tp`` ranks via :func:`hybridpar.launch`) and return the result."""
    from transformers import AutoTokenizer

    from hybridpar.distributed.launcher import launch, resolve_backend
    from hybridpar.models.config import ModelConfig, check_tp_size
    from hybridpar.models.default_checkpoint import resolve_model
    from hybridpar.models.model_wrapper import parse_dtype

    torch_dtype = parse_dtype(dtype)
    backend = resolve_backend(backend, tp)
    path = resolve_model(model_name)
    config = ModelConfig.from_pretrained(path)
    check_tp_size(config, tp)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    prompt_ids = [list(tokenizer(p).input_ids) for p in prompts]
    device = "cuda:0" if backend == "nccl" else "cpu"
    ref = hf_reference(path, prompt_ids, max_new_tokens, torch_dtype, device)
    results = launch(verify_worker, tp, tp, str(path), ref.prompts, ref.continuations, max_new_tokens, dtype,
                     load_format, backend=backend, timeout=timeout)
    metrics = compare(ref, results[0]["logits"], results[0]["tokens"])
    passed, criterion = judge(metrics, torch_dtype, max_new_tokens)
    return VerifyResult(model=model_name or "hybridpar/qwen2-tiny", architecture=config.architecture, tp=tp,
                        dtype=str(torch_dtype).removeprefix("torch."), backend=backend, load_format=load_format,
                        max_new_tokens=max_new_tokens, passed=passed, criterion=criterion, **metrics)


def format_result(r: VerifyResult) -> str:
    rows = [("model", f"{r.model} ({r.architecture})"), ("tp / backend / dtype", f"{r.tp} / {r.backend} / {r.dtype}"),
            ("load format", r.load_format), ("prefill max |diff|", f"{r.prefill_max_abs:.3e}"),
            ("decode max |diff|", f"{r.decode_max_abs:.3e}"), ("max relative error", f"{r.max_rel_err:.3e}"),
            ("greedy tokens matching", f"{r.greedy_match} / {r.max_new_tokens}"), ("criterion", r.criterion),
            ("result", "PASS" if r.passed else "FAIL")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    parser.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"])
    parser.add_argument("--model-name", default=None, help="built-in name, local directory or hub id "
                                                           "(default: built-in hybridpar/qwen2-tiny)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--load-format", default="sharded", choices=["sharded", "full"])
    args = parser.parse_args(argv)
    try:  # every check of verify() runs in this process before any rank starts
        result = verify(args.tp, args.dtype, args.backend, args.model_name, args.max_new_tokens,
                        load_format=args.load_format)
    except (ValueError, FileNotFoundError) as exc:
        config_error(parser.prog, exc)
    print(format_result(result))
    print("VERIFY_JSON " + json.dumps(asdict(result)))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
