"""The text the built-in tiny checkpoints learn at creation time, and how they learn it.

Why train them at all. A randomly initialised model has nearly flat next-token distributions
(qwen2-tiny: logit standard deviation ~0.4 over 259 byte tokens, top-2 gaps ~0.1), so the
rounding noise of bf16 (~1% of a logit) flips its greedy argmax: a correct tensor-parallel bf16
run then disagrees with transformers after a few tokens, and ``hybridpar.models.verify --dtype bf16``
fails for no fault of the code. A model trained for 10-15 CPU-seconds on :data:`TINY_CORPUS` is
confident (median top-1/top-2 logit gap of several units on the text) and recites the text, so bf16
and fp32 agree on the greedy tokens and the course's demos print readable sentences instead of
byte soup. The text contains the prompts of ``verify`` and of the demos ("The capital of France
is", "def fibonacci(n):", "Tensor parallelism splits every weight matrix", "1, 2, 3,", "Once upon
a time"), so those are continued from the text too. Only the tiny recipes are trained; the realistic shapes (0.5B, 7B, 8B) keep random
weights, which is all a benchmark needs.

The recipe (:class:`TrainRecipe`, :func:`train_on_corpus`). transformers' own model class for the
checkpoint's config (``AutoModelForCausalLM.from_config``), float32 on the CPU, learns the corpus as
a byte-level language model (the tokenizer maps byte ``b`` to id ``b``; the corpus is treated as a
loop, so text never ends and no EOS is learned). Weights start from N(0, 1/fan_in) (embeddings
N(0, 0.1^2), norms 1, biases 0), drawn from a generator seeded with the recipe seed; then AdamW
(betas 0.9/0.99, no weight decay) with a linear warm-up and a cosine decay runs a fixed number of
steps (500) on windows of the corpus (8 x 96 bytes). Half the windows begin at a random byte, half
where a sentence or line begins, as prompts do: without the latter a short prompt such as "Once
upon a time" gets a poor continuation although text deep inside a window is recited well. A
BOS-prepending tokenizer gets BOS as the first token of every window, as at inference. It costs
about 10-15 s of one CPU core per tiny recipe (memoised per process; then cached on disk).

Determinism. Training runs with one intra-op thread, ``torch.use_deterministic_algorithms(True)``
and a forked global RNG (the caller's thread count, flags and random state are restored), so the
same torch build on the same CPU instruction set writes bit-identical weights. Another build or
CPU may round differently and write slightly different (equally trained) weights; nothing depends
on that: every correctness check compares hybridpar against transformers on whatever weights the
checkpoint holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

TINY_CORPUS = """\
Tensor parallelism splits every weight matrix of a layer across the GPUs of one node. Each GPU \
holds a slice of the columns or of the rows, computes a partial result on its slice, and one \
all-reduce adds the partial results together. A transformer block needs two all-reduces: one after \
the attention output projection and one after the MLP down projection.

The first linear layer is split by columns, so every rank computes its own heads or its own \
intermediate features without talking to anyone. The second linear layer is split by rows, so every \
rank holds a partial sum of the output. The all-reduce turns the partial sums into the full output, \
and every rank continues with the same hidden state.

The KV cache stores the keys and values of every token that the model has already seen. During \
decoding the model computes attention for one new token per request, and it reads the whole KV cache \
to do so. That is why decoding is limited by memory bandwidth and not by arithmetic. A bigger batch \
reads the weights once for many tokens, but each request still reads its own KV cache.

Under tensor parallelism the KV cache is split by heads. Each rank keeps the keys and values of its \
own KV heads. When there are more ranks than KV heads, the KV heads are replicated, and two ranks \
store the same head.

A radix tree remembers the prompts that the server has already processed. Each edge of the tree \
holds a run of tokens, and each node points to the slots of the KV cache that hold their keys and \
values. When a new request arrives, the server walks down the tree and finds the longest prefix that \
is already cached. Only the rest of the prompt needs a prefill. Requests that share a system prompt \
share its KV cache, and the cache hit rate goes up.

When the memory pool is full, the tree evicts the least recently used leaves. A node that a running \
request still uses is locked, and a locked node is never evicted. Under tensor parallelism every \
rank holds the same tree, so every rank makes the same decision and the slots stay in step.

Token parallelism splits the batch instead of the weights. The root rank of each token parallel \
group computes the queries, keys and values, scatters the requests across the group, and every rank \
runs attention for its own requests against its own KV cache. The outputs are gathered back to the \
root, which runs the rest of the layer. Each rank stores the KV cache of its own requests only, so \
the group can hold a larger batch.

A collective is an operation that every rank of a group calls together. An all-reduce adds a tensor \
across the ranks and gives the sum to everyone. An all-gather concatenates the pieces of all ranks. \
A reduce-scatter adds the tensors and gives each rank one piece of the sum. A broadcast copies a \
tensor from one rank to all the others.

Once upon a time a model grew too large for one GPU. Its engineers cut every layer into slices, \
gave one slice to each GPU, and taught the GPUs to add up their answers. The model was fast again.

A small program that the server is asked to write:

def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.

Counting is easy for a language model: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10.

Greedy decoding picks the token with the highest probability at every step. Sampling draws the next \
token from the distribution, after temperature, top-k and top-p have reshaped it. In bfloat16 the \
logits carry rounding noise, and a model that is not sure about the next token can change its \
answer. A trained model is sure, so greedy decoding gives the same text in every precision.

To check a sharded model, load the same checkpoint into the reference model, run both on the same \
prompts, and compare the logits. If the logits agree, the sharding is correct.
"""


@dataclass(frozen=True)
class TrainRecipe:
    """How a tiny checkpoint learns :data:`TINY_CORPUS` (defaults: 384k bytes seen, ~100 passes over the text)."""

    steps: int = 500
    batch_size: int = 8
    seq_len: int = 96
    lr: float = 1e-2
    warmup_steps: int = 30
    betas: tuple[float, float] = (0.9, 0.99)
    embed_std: float = 0.1
    sentence_start_fraction: float = 0.5  # windows that begin where a sentence or line begins, like prompts

    def fingerprint(self) -> dict[str, Any]:
        """Everything the trained weights depend on besides the config and the seed (for cache keys)."""
        return {**asdict(self), "corpus_sha256": hashlib.sha256(TINY_CORPUS.encode()).hexdigest()[:16]}


def corpus_ids() -> list[int]:
    """The corpus as token ids of the built-in byte-level tokenizers (id == byte value)."""
    return list(TINY_CORPUS.encode("ascii"))


def sentence_starts() -> list[int]:
    """Offsets in the corpus where a line or a sentence begins (where a prompt would begin)."""
    text = TINY_CORPUS
    return [i for i in range(len(text)) if text[i] not in " \n" and (i == 0 or text[i - 1] == "\n"
                                                                    or text[i - 2:i] in (". ", ": "))]


@contextmanager
def deterministic_cpu() -> Iterator[None]:
    """One intra-op thread, deterministic algorithms, a forked global RNG; all restored on exit."""
    threads = torch.get_num_threads()
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_num_threads(threads)


def _init_weights(model: torch.nn.Module, seed: int, embed_std: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied weights appear once
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif "embed_tokens" in name or name == "lm_head.weight":
                p.normal_(0.0, embed_std, generator=gen)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=gen)


def _train(config: dict[str, Any], seed: int, bos_token_id: int | None, recipe: TrainRecipe) -> dict[str, torch.Tensor]:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    with deterministic_cpu():
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
        _init_weights(model, seed, recipe.embed_std)
        ids = corpus_ids()
        n = len(ids)
        loop = torch.tensor(ids + ids[: recipe.seq_len], dtype=torch.long)  # windows wrap around the end
        starts_at = torch.tensor(sentence_starts())
        gen = torch.Generator().manual_seed(seed + 1)
        opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas, weight_decay=0.0, foreach=True)
        warm, steps = recipe.warmup_steps, recipe.steps
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1.0 + math.cos(math.pi * s / steps)))
        model.train()
        for _ in range(steps):
            starts = torch.randint(0, n, (recipe.batch_size,), generator=gen)
            aligned = torch.rand(recipe.batch_size, generator=gen) < recipe.sentence_start_fraction
            pick = starts_at[torch.randint(0, len(starts_at), (recipe.batch_size,), generator=gen)]
            starts = torch.where(aligned, pick, starts)
            x = torch.stack([loop[s:s + recipe.seq_len] for s in starts.tolist()])
            if bos_token_id is not None:
                x = torch.cat([torch.full((recipe.batch_size, 1), bos_token_id), x[:, :-1]], dim=1)
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


_TRAINED: dict[str, dict[str, torch.Tensor]] = {}
_LOCK = threading.Lock()


def train_on_corpus(config: dict[str, Any], seed: int, bos_token_id: int | None = None,
                    recipe: TrainRecipe = TrainRecipe()) -> dict[str, torch.Tensor]:
    """float32 weights (transformers' state-dict names) of the ``config`` model trained on the corpus.

    A pure function of its arguments on a given torch build and CPU; memoised per process (a sharded
    and an unsharded recipe, or threads racing to write the same checkpoint, train once). The
    returned tensors are shared with the memo: do not modify them in place.
    """
    key = json.dumps([config, seed, bos_token_id, recipe.fingerprint()], sort_keys=True, default=str)
    with _LOCK:
        if key not in _TRAINED:
            _TRAINED[key] = _train(config, seed, bos_token_id, recipe)
        return _TRAINED[key]
