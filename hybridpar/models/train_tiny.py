"""Train the built-in ``hybridpar/qwen2-tiny``: a small Qwen2 that learned this course's own text.

The checkpoint in ``hybridpar/models/checkpoints/qwen2-tiny-book/`` is the output of this script, run
once and committed. Those files, not a re-run, are the source of truth: nothing in the package trains at
import or test time, and a re-run on another machine gives slightly different weights.

From the repository root (the corpus is the book's source, which an installed wheel does not carry)::

    python -m hybridpar.models.train_tiny --device cuda      # under two minutes on one GPU (92 s of training on an H200)
    python -m hybridpar.models.train_tiny --device cpu --steps 20 --out /tmp/qwen2-tiny-book   # a smoke run

On a CPU a step of 16 x 512 tokens takes about 15 s on one thread, so a full run would take hours: train
on a GPU, and use the CPU only to try the pipeline (the smoke run above takes about five minutes and
writes a checkpoint that loads but has learned little).

What it does, all of it set by :class:`TinyRecipe`:

1. **Corpus** (:func:`book_corpus`): the prose of ``intro.md``, ``glossary.md``, ``chapters/*.md`` and the
   markdown cells of ``labs/*.ipynb``. Code cells, literal includes, code blocks, display math, tables
   and MyST markup (``{term}`...```, ``{cite}`...```, labels, directive options) are dropped, so the
   model sees paragraphs of English. The glossary also becomes question-and-answer chats
   (``What is a KV cache?`` -> its definition) in the ChatML format of the chat template.
2. **Tokenizer** (:func:`train_tokenizer`): byte-level BPE trained with the ``tokenizers`` library on
   that text, ``vocab_size`` entries in all: the special tokens of the other built-in Qwen tokenizers
   (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``; ids 0, 1, 2), the 256 byte tokens, then merges.
   The size is odd on purpose, so vocabulary-parallel embeddings must pad it at TP 2 and TP 4.
3. **Model**: ``transformers``' ``Qwen2ForCausalLM`` of :attr:`TinyRecipe.config` (8 query heads, 4 KV
   heads: TP 1, 2 and 4 and every token-parallel layout shard it), trained with AdamW on random windows
   of the token stream (documents separated by ``<|endoftext|>``), bf16 autocast on a GPU.
4. **Files** (:func:`write_checkpoint`): ``config.json``, ``generation_config.json``, ``tokenizer.json``,
   ``tokenizer_config.json`` (with a ChatML ``chat_template``) and ``model.safetensors`` (float32, tied
   embeddings stored once), plus ``training.json`` with the recipe and the loss curve.

:func:`compare_dtypes` then checks that float32 and bfloat16 give the same greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hybridpar.models.book_corpus import EOS, IM_END, IM_START, REPO_ROOT, SPECIAL_TOKENS, book_corpus

CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints" / "qwen2-tiny-book"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TinyRecipe:
    """Everything that decides the trained checkpoint."""

    corpus: tuple[str, ...] = ("intro.md", "glossary.md", "chapters/*.md", "labs/*.ipynb")  # globs under the repo
    vocab_size: int = 2051  # special tokens + 256 bytes + merges; odd: padded by vocab-parallel layers
    min_frequency: int = 2  # a BPE merge needs a pair seen at least this often
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    seq_len: int = 512  # training window in tokens (every position the model may see)
    batch_size: int = 16
    steps: int = 4000
    lr: float = 3e-3  # peak; linear warm-up, cosine decay to lr_min
    lr_min: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    chat_repeats: int = 2  # copies of the glossary chats in the token stream
    seed: int = 0

    @property
    def config(self) -> dict[str, Any]:
        """The transformers ``config.json`` of the model (special-token ids from :data:`SPECIAL_TOKENS`)."""
        from hybridpar.models.default_checkpoint import _qwen2_config

        cfg = _qwen2_config(self.vocab_size, self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads,
                            self.num_kv_heads, max_pos=self.max_position_embeddings, rope_theta=self.rope_theta,
                            eos=SPECIAL_TOKENS.index(EOS), tie=True, dtype="float32")
        cfg["eos_token_id"] = [SPECIAL_TOKENS.index(EOS), SPECIAL_TOKENS.index(IM_END)]  # documents and chat turns
        return cfg


# --------------------------------------------------------------------------- tokenizer
def train_tokenizer(texts: Iterable[str], recipe: TinyRecipe):
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``recipe.vocab_size`` entries (special tokens first)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size, min_frequency=recipe.min_frequency, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    plain = [t.replace(IM_START, " ").replace(IM_END, " ") for t in texts]  # the trainer does not split specials
    tok.train_from_iterator(plain, trainer)
    if tok.get_vocab_size() != recipe.vocab_size:
        raise RuntimeError(f"the tokenizer has {tok.get_vocab_size()} entries, not {recipe.vocab_size}: "
                           f"the corpus is too small for that many merges")
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    return tok


def token_stream(tokenizer: Any, docs: Sequence[str], chats: Sequence[str], recipe: TinyRecipe) -> torch.Tensor:
    """Every document followed by ``<|endoftext|>``, then the chats (``chat_repeats`` times), as one id tensor."""
    eos = tokenizer.token_to_id(EOS)
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer.encode(doc).ids + [eos]
    for _ in range(recipe.chat_repeats):
        for chat in chats:
            ids += tokenizer.encode(chat).ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------- training
def lr_at(step: int, recipe: TinyRecipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr_min + 0.5 * (recipe.lr - recipe.lr_min) * (1 + math.cos(math.pi * t))


def train_model(recipe: TinyRecipe, stream: torch.Tensor, device: str = "cpu", log_every: int = 250):
    """Train ``Qwen2ForCausalLM(recipe.config)`` on random windows of ``stream``; returns (model, losses)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(recipe.seed)
    cfg = dict(recipe.config)
    cfg.pop("architectures"), cfg.pop("model_type"), cfg.pop("torch_dtype")
    model = Qwen2ForCausalLM(Qwen2Config(**cfg)).to(device)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(recipe.seed)
    data = stream.to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else torch.autocast(
        "cpu", enabled=False)
    losses: list[tuple[int, float]] = []
    start, running = time.perf_counter(), 0.0
    for step in range(recipe.steps):
        starts = torch.randint(0, len(stream) - recipe.seq_len - 1, (recipe.batch_size,), generator=gen)
        idx = starts[:, None] + torch.arange(recipe.seq_len + 1)[None, :]
        batch = data[idx.to(device)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        with autocast:
            logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        opt.step()
        running += loss.item() if (step + 1) % 10 == 0 or step + 1 == recipe.steps else 0.0
        if (step + 1) % log_every == 0 or step + 1 == recipe.steps:
            losses.append((step + 1, round(loss.item(), 4)))
            print(f"step {step + 1:>5}/{recipe.steps}  loss {loss.item():.3f}  lr {lr_at(step, recipe):.2e}  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    return model, losses


# --------------------------------------------------------------------------- files
def write_checkpoint(out: Path, recipe: TinyRecipe, tokenizer: Any, model: Any, info: dict[str, Any]) -> Path:
    """Write the Hugging Face files of the trained model into ``out`` (created if missing)."""
    from safetensors.torch import save_file

    from hybridpar.models.recipe_files import checkpoint_tensor_shapes

    out.mkdir(parents=True, exist_ok=True)
    config = recipe.config
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    tokenizer.save(str(out / "tokenizer.json"))
    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": None, "pad_token": EOS,
                  "add_bos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": recipe.max_position_embeddings, "chat_template": CHAT_TEMPLATE}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    shapes = checkpoint_tensor_shapes(config)
    state = model.state_dict()
    tensors = {name: state[name].detach().float().cpu().contiguous() for name in shapes}
    for name, shape in shapes.items():
        assert tuple(tensors[name].shape) == shape, (name, tensors[name].shape, shape)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "training.json").write_text(json.dumps({"recipe": asdict(recipe), **info}, indent=2) + "\n")
    return out


@dataclass
class DtypeComparison:
    """Greedy tokens of float32 and bfloat16 (transformers), per prompt."""

    device: str
    prompts: list[str]
    fp32_text: list[str] = field(default_factory=list)
    matching_tokens: list[int] = field(default_factory=list)  # common prefix of the fp32 and bf16 tokens
    new_tokens: int = 0

    @property
    def identical(self) -> bool:
        return all(m == self.new_tokens for m in self.matching_tokens)


def compare_dtypes(path: str | Path, prompts: Sequence[str], new_tokens: int = 32,
                   device: str = "cpu") -> DtypeComparison:
    """Greedy ``new_tokens`` per prompt with ``AutoModelForCausalLM`` in float32 and in bfloat16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    result = DtypeComparison(device, list(prompts), new_tokens=new_tokens)
    outs = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        outs[dtype] = []
        for p in prompts:
            ids = torch.tensor([tok(p).input_ids], device=device)
            with torch.no_grad():
                o = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=tok.pad_token_id)
            outs[dtype].append(o[0, ids.shape[1]:].tolist())
    for a, b in zip(outs[torch.float32], outs[torch.bfloat16]):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        result.matching_tokens.append(n)
        result.fp32_text.append(tok.decode(a, skip_special_tokens=True))
    return result


SAMPLE_PROMPTS = ("Tensor parallelism splits", "The KV cache", "A radix tree", "Token parallelism",
                  "The root rank", "Each rank holds")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help=f"default: {CHECKPOINT_DIR}")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="override TinyRecipe.steps")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="repository root holding the corpus")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = TinyRecipe() if args.steps is None else TinyRecipe(steps=args.steps)
    docs, chats = book_corpus(recipe, args.root)
    tokenizer = train_tokenizer(docs + chats, recipe)
    stream = token_stream(tokenizer, docs, chats, recipe)
    print(f"corpus: {len(docs)} files, {sum(map(len, docs)):,} characters, {len(chats)} glossary chats; "
          f"{len(stream):,} tokens with a vocabulary of {tokenizer.get_vocab_size()}", flush=True)
    start = time.perf_counter()
    model, losses = train_model(recipe, stream, args.device)
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())
    info = {"tokens": len(stream), "parameters": params, "device": args.device, "train_seconds": round(seconds, 1),
            "torch": torch.__version__, "losses": losses}
    write_checkpoint(args.out, recipe, tokenizer, model, info)
    print(f"{params:,} parameters, {seconds:.0f} s; wrote {args.out}")
    cmp = compare_dtypes(args.out, SAMPLE_PROMPTS, device=args.device)
    for p, text, m in zip(cmp.prompts, cmp.fp32_text, cmp.matching_tokens):
        print(f"{p!r} -> {text!r}   (bf16 matches {m}/{cmp.new_tokens} tokens)")
    print("float32 and bfloat16 greedy tokens identical" if cmp.identical else "float32 and bfloat16 DIFFER")
    return 0


if __name__ == "__main__":
    sys.exit(main())
