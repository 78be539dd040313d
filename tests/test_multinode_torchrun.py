"""Two torchrun agents on 127.0.0.1 as two nodes (2 ranks each): `hybridpar generate` with TP 2 x TKNP 2.

The recipe of the README and chapter 8, with both "nodes" on this machine: each agent joins the c10d
rendezvous at the same endpoint, the four ranks form one world, and each rank takes its device
from LOCAL_RANK. The text must be the single-node engine's, which tests/test_engine.py holds to
transformers' greedy tokens: here it is compared with transformers directly.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.torchrun_util import _RANK_VARS, ROOT

PROMPTS = ["The radix cache", "A token-parallel group"]
MAX_TOKENS = 8


def _torchrun_node(node_rank: int, endpoint: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in _RANK_VARS}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    prompts = [a for p in PROMPTS for a in ("--prompt", p)]
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node_rank),
         "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--local-addr", "127.0.0.1",
         "-m", "hybridpar", "generate", "--tensor-parallel-size", "2", "--token-parallel-size", "2",
         "--enable-token-parallel", "--force-cpu", "--max-tokens", str(MAX_TOKENS), *prompts,
         "--distributed-executor-backend", "torchrun"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _reference_lines() -> list[str]:
    """What rank 0 prints for PROMPTS: transformers' greedy continuation, cut after the first EOS."""
    from transformers import AutoTokenizer

    from hybridpar.models.default_checkpoint import resolve_model
    from hybridpar.models.verify import hf_reference

    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(str(path))
    ref = hf_reference(path, [tok(p).input_ids for p in PROMPTS], max_new_tokens=MAX_TOKENS)
    lines = []
    for prompt, ids in zip(PROMPTS, ref.continuations):
        if tok.eos_token_id in ids:
            ids = ids[:ids.index(tok.eos_token_id) + 1]
        lines.append(f"  {prompt!r} -> {tok.decode(ids, skip_special_tokens=True)!r}")
    return lines


@pytest.mark.slow
def test_two_torchrun_nodes_give_the_single_node_tokens() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    nodes = [_torchrun_node(r, endpoint) for r in (0, 1)]
    try:
        outs = [n.communicate(timeout=240) for n in nodes]
    finally:
        for n in nodes:  # on a timeout: SIGTERM lets each agent end its ranks
            if n.poll() is None:
                n.terminate()
                n.wait(timeout=30)
    text = "".join(out + err for out, err in outs)
    assert [n.returncode for n in nodes] == [0, 0], text[-4000:]
    assert "on 4 rank(s) (TP 2 x TKNP 2, torchrun)" in text, text[-4000:]
    printed = [line.rsplit(" (", 1)[0] for line in text.splitlines() if " -> " in line]
    assert printed == _reference_lines(), text[-4000:]
