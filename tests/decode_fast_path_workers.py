"""Rank workers for tests/test_decode_fast_path.py (importable by spawned ranks)."""
from __future__ import annotations

import torch

from hybridpar.distributed.parallel_state import initialize_tensor_parallel
from hybridpar.models.generate import generate
from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper
from hybridpar.core import SamplingParams
from hybridpar.radix.scheduler import TPScheduler

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17], [(5 * j + 3) % 250 for j in range(58)]]
LENGTHS = (6, 3, 9, 12)  # the last one crosses the 64-token length bucket; the batch shrinks 4 -> 1


def fast_path_worker(tp: int, names: list[str], dtype: str = "fp32") -> dict:
    """Per model: reference generate vs the static decode path (twice: graphs/caches reused), and
    the scheduler with and without ``use_cuda_graph``. Returns tokens and logit differences."""
    initialize_tensor_parallel(tp)
    out: dict = {}
    for name in names:
        m = TPRadixAttentionModelWrapper(name, dtype=dtype)
        params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in LENGTHS]
        ref = generate(m.model, PROMPTS, params, return_logits=True)
        runs = [generate(m.model, PROMPTS, params, return_logits=True, use_cuda_graph=True) for _ in range(2)]
        runner = m.model._hybridpar_decode_runner.runner
        sched = []
        for graph in (False, True):
            s = TPScheduler(m, use_cuda_graph=graph, max_total_tokens=1024)
            for p, sp in zip(PROMPTS, params):
                s.add_request(p, sampling=sp)
            sched.append([r.output_ids for r in s.process_requests().values()])
        graph_runner = s.runner.graph_runner
        out[name] = {
            "ref_tokens": [o.token_ids for o in ref],
            "min_top2_gap": min(float((lg.topk(2, -1).values[:, 0] - lg.topk(2, -1).values[:, 1]).min()) for lg in
                                (o.logits for o in ref)),
            "fast_tokens": [[o.token_ids for o in r] for r in runs],
            "max_logit_diff": max(float((a.logits - b.logits).abs().max()) for r in runs for a, b in zip(ref, r)),
            "graph_mode": runner.use_graph,
            "captures": runner.captures,
            "gen_steps_loads": (runner.steps, runner.loads),
            "sched_steps_loads": (graph_runner.steps, graph_runner.loads),
            "sched_tokens": sched,
        }
    return out


def _decode_with_runner(m, prompts: list[list[int]], steps: int, graph: bool, attention_backend: str | None):
    """Prefill ``prompts`` into a fresh ContiguousDecodeRunner, then ``steps`` greedy decode steps through it."""
    from hybridpar.models.attention_backend import ForwardBatch
    from hybridpar.models.cuda_graph import ContiguousDecodeRunner

    batch = len(prompts)
    runner = ContiguousDecodeRunner(m.model, batch, 128, use_cuda_graph=graph, attention_backend=attention_backend)
    rows = runner.cache.alloc(batch)
    fb = ForwardBatch.build(runner.cache, rows, [0] * batch, [len(p) for p in prompts], m.device)
    ids = torch.tensor([t for p in prompts for t in p], device=m.device)
    logits = m.model.compute_logits(m.model(ids, fb.positions, fb)[fb.last_token_indices()])
    lens = [len(p) for p in prompts]
    tokens, all_logits = [], []
    nxt = logits.argmax(-1).tolist()
    for _ in range(steps):
        tokens.append(nxt)
        lens = [n + 1 for n in lens]
        logits = runner.decode(rows, lens, nxt).clone()
        all_logits.append(logits.float().cpu())
        nxt = runner.runner.greedy_tokens()  # the step's own argmax: the next step continues on the device
        assert nxt == logits.argmax(-1).tolist()
    return tokens, torch.stack(all_logits), runner.runner.captures


def graph_vs_eager_worker(name: str, batch: int, steps: int) -> dict:
    """On CUDA: the same decode steps through a captured runner and an eager runner (same weights)."""
    initialize_tensor_parallel(torch.distributed.get_world_size())
    m = TPRadixAttentionModelWrapper(name, dtype="bf16")
    prompts = [[(7 * i + j) % 250 for j in range(5 + 3 * i)] for i in range(batch)]
    outs = {graph: _decode_with_runner(m, prompts, steps, graph, None) for graph in (True, False)}
    same = outs[True][0] == outs[False][0]
    diffs = float((outs[True][1] - outs[False][1]).abs().max())
    return {"same_tokens": same, "max_logit_diff": diffs, "captures": outs[True][2]}


def backend_graph_worker(name: str, batch: int, steps: int) -> dict:
    """On CUDA: the same captured decode steps with the torch_native and the Triton attention backend."""
    initialize_tensor_parallel(1)
    m = TPRadixAttentionModelWrapper(name, dtype="bf16")
    prompts = [[(5 * i + j) % 250 for j in range(4 + 7 * i)] for i in range(batch)]
    outs = {b: _decode_with_runner(m, prompts, steps, True, b) for b in ("torch_native", "triton")}
    return {"same_tokens": outs["triton"][0] == outs["torch_native"][0],
            "max_logit_diff": float((outs["triton"][1] - outs["torch_native"][1]).abs().max()),
            "max_abs_logit": float(outs["torch_native"][1].abs().max()),
            "captures": {b: o[2] for b, o in outs.items()}}
