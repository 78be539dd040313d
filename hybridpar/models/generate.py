"""Batched generation over the contiguous KV cache: ragged prefill, then decode steps.

Every rank of the tensor-parallel group runs this same loop on the same prompts. The logits are
all-gathered, so every rank holds the full vocabulary; even so, the next tokens are chosen on
TP rank 0 and broadcast (one tiny collective per step), so the ranks can never disagree on the
tokens they feed back, whatever the floating-point behaviour of the collectives.

A request leaves the batch when it produces an EOS token (unless ``ignore_eos``) or reaches its
``max_new_tokens``; the others keep decoding.

With ``use_cuda_graph=True`` the decode steps run through a
:class:`~hybridpar.models.cuda_graph.ContiguousDecodeRunner` kept on the model: batched decode
attention over static buffers, captured as one CUDA graph per batch-size bucket on a GPU (run
eagerly on the CPU). Prefill is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hybridpar.distributed.communication_op import broadcast
from hybridpar.models.attention_backend import ForwardBatch, ForwardMode
from hybridpar.models.decoder import DecoderForCausalLM
from hybridpar.models.sampling import SamplingParams, sample


@dataclass
class GenerationOutput:
    """One request's result. ``logits[j]`` (if requested) produced ``token_ids[j]``."""

    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "eos" or "length"
    logits: torch.Tensor | None = None


def _device(model: DecoderForCausalLM) -> torch.device:
    return model.lm_head.weight.device


def _check_prompts(model: DecoderForCausalLM, prompts: Sequence[Sequence[int]], extra: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    vocab = model.config.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    longest = max(len(p) for p in prompts) + extra
    if longest > model.config.max_position_embeddings:
        raise ValueError(f"prompt + new tokens = {longest} exceeds max_position_embeddings="
                         f"{model.config.max_position_embeddings}")


def _agree(tokens: list[int], model: DecoderForCausalLM) -> list[int]:
    """TP rank 0's tokens on every rank."""
    t = torch.tensor(tokens, dtype=torch.long, device=_device(model))
    return broadcast(t, src=0, group=model.tp_group).tolist()


@torch.no_grad()
def generate(model: DecoderForCausalLM, prompts: Sequence[Sequence[int]],
             sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
             eos_token_ids: Sequence[int] | None = None, return_logits: bool = False,
             use_cuda_graph: bool = False, attention_backend: str | None = None) -> list[GenerationOutput]:
    """Generate for a batch of token-id prompts of any lengths; returns one output per prompt.

    ``sampling``: one :class:`SamplingParams` for all prompts or one per prompt. ``eos_token_ids``:
    defaults to the config's EOS ids. ``use_cuda_graph``: the fast decode path (module docstring), with
    decode attention ``attention_backend`` (``"torch_native"``, ``"triton"``; ``None``: the device's default).
    """
    params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
    if len(params) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
    eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    _check_prompts(model, prompts, max(p.max_new_tokens for p in params))
    device = _device(model)
    gens = [p.make_generator() for p in params]
    outs = [GenerationOutput(list(p), [], "length", [] if return_logits else None) for p in prompts]
    max_len = max(len(p) + s.max_new_tokens for p, s in zip(prompts, params))
    runner = None
    if use_cuda_graph:
        from hybridpar.models.cuda_graph import contiguous_runner_for

        runner = contiguous_runner_for(model, len(prompts), max_len, attention_backend=attention_backend)
        cache = runner.cache
    else:
        cache = model.make_kv_cache(len(prompts), max_len)
    rows = cache.alloc(len(prompts))
    active = list(range(len(prompts)))
    fb = ForwardBatch.build(cache, rows, [0] * len(prompts), [len(p) for p in prompts], device)
    input_ids = [t for p in prompts for t in p]
    while active:
        step_params = [params[i] for i in active]
        if fb.forward_mode == ForwardMode.DECODE and runner is not None:
            logits = runner.decode(fb.req_pool_indices, fb.seq_lens, input_ids)
            tokens = runner.runner.sample(logits, step_params, [gens[i] for i in active])
        else:
            hidden = model(torch.tensor(input_ids, dtype=torch.long, device=device), fb.positions, fb)
            logits = model.compute_logits(hidden[fb.last_token_indices()])
            tokens = sample(logits, step_params, [gens[i] for i in active])
        tokens = _agree(tokens, model)
        still = []
        for j, (i, tok) in enumerate(zip(active, tokens)):
            out = outs[i]
            out.token_ids.append(tok)
            if return_logits:
                out.logits.append(logits[j].float().cpu())
            if tok in eos and not params[i].ignore_eos:
                out.finish_reason = "eos"
            elif len(out.token_ids) < params[i].max_new_tokens:
                still.append(i)
        active = still
        if active:
            prefix = [len(outs[i].prompt_ids) + len(outs[i].token_ids) - 1 for i in active]
            fb = ForwardBatch.build(cache, [rows[i] for i in active], prefix, [1] * len(active), device)
            input_ids = [outs[i].token_ids[-1] for i in active]
    cache.free(rows)
    if return_logits:
        for out in outs:
            out.logits = torch.stack(out.logits)
    return outs


@torch.no_grad()
def teacher_forced_logits(model: DecoderForCausalLM, prompts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Logits of every position, computed the way generation computes them: one ragged prefill over
    the prompts, then one batched decode step per continuation token (fed, not sampled).

    Returns, per request, ``[len(prompt) + len(continuation), V]`` float32 on the CPU: row ``j`` is the
    prediction after token ``j`` of ``prompt + continuation``; the first ``len(prompt)`` rows come from
    prefill, the rest from decode steps. Comparable with one full forward of a reference model.
    """
    if len(prompts) != len(continuations):
        raise ValueError("one continuation per prompt")
    _check_prompts(model, prompts, max(len(c) for c in continuations))
    device = _device(model)
    cache = model.make_kv_cache(len(prompts), max(len(p) + len(c) for p, c in zip(prompts, continuations)))
    rows = cache.alloc(len(prompts))
    fb = ForwardBatch.build(cache, rows, [0] * len(prompts), [len(p) for p in prompts], device)
    input_ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    prefill = model.compute_logits(model(input_ids, fb.positions, fb)).float().cpu()
    results = list(prefill.split([len(p) for p in prompts]))
    for step in range(max(len(c) for c in continuations)):
        active = [i for i, c in enumerate(continuations) if step < len(c)]
        prefix = [len(prompts[i]) + step for i in active]
        fb = ForwardBatch.build(cache, [rows[i] for i in active], prefix, [1] * len(active), device)
        input_ids = torch.tensor([continuations[i][step] for i in active], dtype=torch.long, device=device)
        logits = model.compute_logits(model(input_ids, fb.positions, fb)).float().cpu()
        for j, i in enumerate(active):
            results[i] = torch.cat([results[i], logits[j:j + 1]])
    cache.free(rows)
    return results
