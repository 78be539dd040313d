"""Importable rank functions for tests/test_model_tp.py (spawned ranks import them by name)."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist

from hybridpar.distributed.parallel_state import destroy_model_parallel, initialize_tensor_parallel
from hybridpar.models.generate import generate
from hybridpar.models.loader import CorruptCheckpointError
from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper
from hybridpar.core import SamplingParams
from hybridpar.models.shard_report import rank_report
from hybridpar.models.verify import model_checks


def _extras(paths: dict[str, str], prompts: list[list[int]], generation: bool) -> dict[str, Any]:
    """Checks beyond "matches transformers", for one TP size (every rank runs them): what each rank
    holds and reads, and (``generation``) batching, sampling, EOS and the other load paths."""
    m = TPRadixAttentionModelWrapper(paths["qwen2"])
    full = TPRadixAttentionModelWrapper(paths["qwen2"], load_format="full")
    out: dict[str, Any] = {"report": rank_report(m),
                           "load_stats": {"sharded": m.load_stats.to_dict(), "full": full.load_stats.to_dict()}}
    if not generation:
        return out
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    sampled = [SamplingParams(max_new_tokens=12, temperature=3.0, top_k=40, top_p=0.95, seed=s, ignore_eos=True)
               for s in range(len(prompts))]
    batch = generate(m.model, prompts, greedy)
    out["batch_greedy"] = [o.token_ids for o in batch]
    out["alone_greedy"] = [generate(m.model, [p], greedy)[0].token_ids for p in prompts]
    out["batch_sampled"] = [o.token_ids for o in generate(m.model, prompts, sampled)]
    out["batch_sampled_again"] = [o.token_ids for o in generate(m.model, prompts, sampled)]
    out["alone_sampled"] = [generate(m.model, [p], s)[0].token_ids for p, s in zip(prompts, sampled)]
    other_seed = [SamplingParams(max_new_tokens=12, temperature=3.0, top_k=40, top_p=0.95, seed=100 + s,
                                 ignore_eos=True) for s in range(len(prompts))]
    out["other_seed_sampled"] = [o.token_ids for o in generate(m.model, prompts, other_seed)]
    # EOS: declare the 5th greedy token of prompt 0 an end-of-sequence token.
    eos = batch[0].token_ids[4]
    stop = generate(m.model, prompts[:1], SamplingParams(max_new_tokens=12), eos_token_ids=[eos])[0]
    out["eos"] = {"eos": eos, "tokens": stop.token_ids, "finish_reason": stop.finish_reason}
    out["full_greedy"] = [o.token_ids for o in generate(full.model, prompts, greedy)]
    indexed = TPRadixAttentionModelWrapper(paths["qwen2_sharded"])
    out["index_files"] = indexed.load_stats.files
    out["index_greedy"] = [o.token_ids for o in generate(indexed.model, prompts, greedy)]
    try:
        TPRadixAttentionModelWrapper(paths["truncated"])
        out["truncated_error"] = None
    except CorruptCheckpointError as exc:
        out["truncated_error"] = str(exc)
    return out


def tp_sweep(tp_sizes: list[int], models: dict[str, dict[str, Any]], paths: dict[str, str],
             extra_tp: list[int], generation_tp: list[int]) -> dict[int, dict[str, Any]]:
    """For each TP size: initialise the groups, check every model against its reference data
    (logits, greedy tokens via :func:`model_checks`), run the extra checks (``extra_tp``; with the
    generation checks for ``generation_tp``), tear the groups down.

    ``models[name] = {"path", "prompts", "continuations", "tp_sizes"}``. Global rank 0 returns everything;
    the other ranks return a per-TP summary of what they hold.
    """
    results: dict[int, dict[str, Any]] = {}
    for tp in tp_sizes:
        initialize_tensor_parallel(tp)
        res: dict[str, Any] = {}
        for name, spec in models.items():
            if tp not in spec["tp_sizes"]:
                continue
            res[name] = model_checks(spec["path"], spec["prompts"], spec["continuations"],
                                     len(spec["continuations"][0]))
        if tp in extra_tp:
            res["extras"] = _extras(paths, models["qwen2"]["prompts"], tp in generation_tp)
        destroy_model_parallel()
        results[tp] = res if dist.get_rank() == 0 else {"extras": res.get("extras")}
    return results
