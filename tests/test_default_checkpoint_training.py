"""The tiny built-in checkpoints are trained on the tiny corpus at creation time
(hybridpar.models.tiny_corpus): deterministically, confidently, and so that bf16 keeps fp32's greedy
tokens. The real qwen2-tiny recipe is trained once; the determinism check uses a short recipe."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hybridpar.distributed.launcher import launch  # noqa: E402
from hybridpar.models.default_checkpoint import BUILTIN_MODELS, default_model_path, write_checkpoint  # noqa: E402
from hybridpar.models.tiny_corpus import TINY_CORPUS, TrainRecipe, corpus_ids, deterministic_cpu  # noqa: E402
from hybridpar.models.verify import LOW_PRECISION_RTOL, compare, hf_reference, verify_worker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def write_short(out: str) -> None:
    """qwen2-tiny with a short version of its training recipe: the same code path, a fraction of the time."""
    spec = replace(BUILTIN_MODELS["qwen2-tiny"], training=TrainRecipe(steps=40))
    write_checkpoint(spec, Path(out))


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The real qwen2-tiny, trained and written from scratch into a fresh cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HYBRIDPAR_CACHE", str(tmp_path_factory.mktemp("hybridpar-cache")))
        return default_model_path()


def test_writing_twice_gives_identical_bytes(tmp_path):
    """Two processes (this one and a fresh one, side by side) train and write the same recipe."""
    there, here = tmp_path / "there", tmp_path / "here"
    there.mkdir()
    here.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    code = f"from tests.test_default_checkpoint_training import write_short; write_short({str(there)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    write_short(str(here))
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    names = sorted(p.name for p in here.iterdir())
    assert names == sorted(p.name for p in there.iterdir()) and "model.safetensors" in names
    for name in names:
        assert (here / name).read_bytes() == (there / name).read_bytes(), name


def test_training_left_the_callers_torch_settings_alone():
    threads = torch.get_num_threads()
    state = torch.get_rng_state()
    with deterministic_cpu():
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        torch.rand(3)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.get_rng_state(), state)


def test_realistic_shapes_stay_random_and_tiny_ones_are_trained():
    assert all(BUILTIN_MODELS[n].training is not None
               for n in ("qwen2-tiny", "qwen2-tiny-sharded", "llama-tiny", "qwen3-tiny"))
    assert all(spec.training is None for n, spec in BUILTIN_MODELS.items() if n.endswith("-shape"))
    assert TINY_CORPUS.isascii() and 3000 <= len(TINY_CORPUS) <= 6000


def test_the_model_is_confident_on_the_text_and_recites_it(written):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = written
    model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager").eval()
    ids = corpus_ids()
    margins, hits = [], []
    with torch.no_grad():
        for start in range(0, len(ids) - 96, 113):  # held-in windows; skip the first 16 (little context)
            x = torch.tensor([ids[start:start + 96]])
            logits = model(x).logits[0, 16:-1]
            top2 = logits.topk(2, dim=-1).values
            margins.append(top2[:, 0] - top2[:, 1])
            hits.append(logits.argmax(-1) == x[0, 17:])
        margin, acc = torch.cat(margins).median().item(), torch.cat(hits).float().mean().item()
        tok = AutoTokenizer.from_pretrained(str(path))
        prompt = tok("The capital of France is", return_tensors="pt").input_ids
        out = model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert margin > 1.0 and acc > 0.8, (margin, acc)
    assert tok.decode(out[0, prompt.shape[1]:]).startswith(" Paris. The capital of Italy is Rome.")


def test_bf16_tp1_keeps_the_fp32_greedy_tokens(written):
    """hybridpar's own model in bf16 (TP 1, gloo): logits within verify's bf16 tolerance of transformers
    in bf16 (the like-for-like reference), and the same 16 greedy tokens as transformers in fp32."""
    from transformers import AutoTokenizer

    path = written
    tok = AutoTokenizer.from_pretrained(str(path))
    prompts = [tok(t).input_ids for t in ("The capital of France is", "def fibonacci(n):", "Once upon a time",
                                          "1, 2, 3,", "Hi")]
    fp32 = hf_reference(path, prompts, 16, torch.float32)
    bf16 = hf_reference(path, prompts, 16, torch.bfloat16)
    got = launch(verify_worker, 1, 1, str(path), bf16.prompts, bf16.continuations, 16, "bf16", "sharded",
                 backend="gloo", timeout=300)[0]
    m = compare(bf16, got["logits"], got["tokens"])
    assert m["max_rel_err"] < LOW_PRECISION_RTOL, m
    assert got["tokens"] == fp32.continuations
