"""Demo: RadixAttention under tensor parallelism on a shared-prefix workload.

``G`` groups x ``P`` prompts share a system prompt of ``S`` tokens per group, then ask a ``Q``-token
question and generate ``O`` tokens. Every TP rank holds its own KV heads at the same slots, rank 0
schedules. The demo prints some outputs, the cache hit rate (cached prompt tokens / prompt tokens)
next to the best one possible, the prefill tokens actually computed, and throughput; with
``--compare`` it also runs the same workload with the radix cache disabled.

    torchrun --nproc_per_node=2 -m hybridpar.demos.radix_demo --force-cpu --model-name qwen2-tiny
    python -m hybridpar.demos.radix_demo --tp 2            # spawns the ranks with hybridpar.launch

From a notebook: ``print(format_report(run_demo(tp=2)))``.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from hybridpar.models.default_checkpoint import DEFAULT_MODEL
from hybridpar.radix.server_args import SCHEDULE_POLICIES, ServerArgs
from hybridpar.radix.workload import SharedPrefixWorkload


@dataclass(frozen=True)
class DemoConfig:
    """Everything a rank needs; checked in the parent before any process starts."""

    model_name: str | None = None
    tp: int = 2
    workload: SharedPrefixWorkload = field(default_factory=lambda: SharedPrefixWorkload(4, 4, 64, 16, 16))
    shuffle: bool = True
    page_size: int = 16
    max_total_tokens: int | None = 8192
    schedule_policy: str = "lpm"
    dtype: str = "fp32"
    compare: bool = True  # also run with the radix cache disabled


@dataclass
class DemoReport:
    """What rank 0 measured. ``outputs``: one dict per request (group, lengths, text)."""

    tp: int
    model: str
    device: str
    num_requests: int
    theoretical_hit_rate: float
    metrics: dict[str, Any]
    baseline: dict[str, Any] | None
    outputs: list[dict[str, Any]]


def _metrics_dict(m: Any) -> dict[str, Any]:
    return {**asdict(m), "cache_hit_rate": m.cache_hit_rate, "output_tokens_per_s": m.output_tokens_per_s,
            "total_tokens_per_s": m.total_tokens_per_s}


def _serve(wrapper: Any, requests: list, **overrides: Any) -> tuple[Any, dict]:
    from hybridpar.radix.scheduler import TPScheduler

    sched = TPScheduler(wrapper, **overrides)
    rids = [sched.add_request(r.prompt_ids, r.max_new_tokens) for r in requests]
    results = sched.process_requests()
    return sched.metrics, {rid: results[rid] for rid in rids}


def demo_rank(cfg: DemoConfig) -> DemoReport:
    """Runs on every rank: build the TP model, serve the workload (and the no-cache baseline)."""
    import torch.distributed as dist

    from hybridpar.distributed.parallel_state import initialize_tensor_parallel
    from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper

    initialize_tensor_parallel(dist.get_world_size())
    wrapper = TPRadixAttentionModelWrapper(cfg.model_name, page_size=cfg.page_size, dtype=cfg.dtype,
                                           max_total_tokens=cfg.max_total_tokens, schedule_policy=cfg.schedule_policy)
    requests = cfg.workload.requests(shuffle=cfg.shuffle)
    _serve(wrapper, requests[:1], disable_radix_cache=True)  # warm-up, so timings exclude first-call costs
    metrics, results = _serve(wrapper, requests)
    baseline = _metrics_dict(_serve(wrapper, requests, disable_radix_cache=True)[0]) if cfg.compare else None
    outputs = []
    if wrapper.tp_group.rank_in_group == 0:
        for req, res in zip(requests, results.values()):
            outputs.append({"group": req.group, "index": req.index, "prompt_tokens": len(req.prompt_ids),
                            "cached_tokens": res.cached_tokens, "ttft_s": res.ttft_s,
                            "text": wrapper.decode(res.output_ids)})
    return DemoReport(wrapper.tp_group.world_size, cfg.model_name or DEFAULT_MODEL, str(wrapper.device),
                      len(requests), cfg.workload.theoretical_hit_rate(cfg.page_size), _metrics_dict(metrics),
                      baseline, outputs)


def check_config(cfg: DemoConfig) -> None:
    """Raise ValueError (naming the fix) for a configuration that cannot run; pure, no processes."""
    from hybridpar.models.config import ModelConfig, check_tp_size
    from hybridpar.models.default_checkpoint import resolve_model

    ServerArgs(page_size=cfg.page_size, max_total_tokens=cfg.max_total_tokens, schedule_policy=cfg.schedule_policy)
    check_tp_size(ModelConfig.from_pretrained(resolve_model(cfg.model_name)), cfg.tp)


def run_demo(tp: int = 2, model_name: str | None = None, backend: str = "auto", **fields: Any) -> DemoReport:
    """Launch ``tp`` ranks with :func:`hybridpar.launch` and return rank 0's :class:`DemoReport`.

    ``fields`` set the other :class:`DemoConfig` fields (``workload=SharedPrefixWorkload(...)``,
    ``shuffle``, ``page_size``, ``max_total_tokens``, ``schedule_policy``, ``compare``, ...).
    """
    return _launch(DemoConfig(model_name=model_name, tp=tp, **fields), backend)


def _launch(cfg: DemoConfig, backend: str) -> DemoReport:
    from hybridpar.distributed.launcher import launch

    check_config(cfg)
    return launch(demo_rank, cfg.tp, cfg, backend=backend, timeout=600.0)[0]


def format_report(report: DemoReport, max_outputs: int = 6) -> str:
    m, b = report.metrics, report.baseline
    lines = [f"RadixAttention demo: {report.model}, TP={report.tp} on {report.device}, {report.num_requests} requests",
             "", "outputs (first few):"]
    for o in report.outputs[:max_outputs]:
        lines.append(f"  group {o['group']} #{o['index']}: {o['prompt_tokens']} prompt tokens, {o['cached_tokens']} "
                     f"cached -> {o['text'][:40]!r}")
    lines += ["", f"cache hit rate        {m['cache_hit_rate']:.3f}   (theoretical max {report.theoretical_hit_rate:.3f}; "
                  f"{m['cached_prompt_tokens']} of {m['prompt_tokens']} prompt tokens)",
              f"prefill tokens        {m['prefill_tokens_computed']} computed"
              + (f"   (radix cache off: {b['prefill_tokens_computed']})" if b else ""),
              f"throughput            {m['output_tokens_per_s']:.1f} output tok/s, {m['total_tokens_per_s']:.1f} total tok/s"
              + (f"   (radix cache off: {b['output_tokens_per_s']:.1f} / {b['total_tokens_per_s']:.1f})" if b else ""),
              f"steps                 {m['prefill_steps']} prefill, {m['decode_steps']} decode; "
              f"{m['preemptions']} preemptions, {m['evicted_tokens']} tokens evicted"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-name", default=None, help="built-in name (qwen2-tiny, llama-tiny, ...), a local "
                        "checkpoint directory or a hub id; default: the built-in qwen2-tiny")
    parser.add_argument("--tp", type=int, default=2, help="TP ranks to spawn when not under torchrun (default 2)")
    parser.add_argument("--force-cpu", action="store_true", help="run on the CPU with gloo even if GPUs are visible")
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--prompts-per-group", type=int, default=4)
    parser.add_argument("--system-len", type=int, default=64)
    parser.add_argument("--question-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--ordered", action="store_true", help="submit group by group instead of shuffled")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-total-tokens", type=int, default=8192, help="KV-pool size in tokens per rank")
    parser.add_argument("--schedule-policy", choices=SCHEDULE_POLICIES, default="lpm")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    parser.add_argument("--no-compare", action="store_true", help="skip the run with the radix cache disabled")
    args = parser.parse_args(argv)
    from hybridpar.distributed.launcher import is_torchrun, run_torchrun

    torchrun = is_torchrun()
    if args.force_cpu and torchrun:  # run_torchrun picks NCCL when it sees GPUs: hide them before CUDA starts
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    try:
        workload = SharedPrefixWorkload(args.groups, args.prompts_per_group, args.system_len, args.question_len,
                                        args.output_len)
        tp = int(os.environ["WORLD_SIZE"]) if torchrun else args.tp
        cfg = DemoConfig(args.model_name, tp, workload, not args.ordered, args.page_size, args.max_total_tokens,
                         args.schedule_policy, args.dtype, not args.no_compare)
        check_config(cfg)
    except ValueError as exc:
        parser.error(str(exc))
    if torchrun:
        report = run_torchrun(demo_rank, cfg)
        if int(os.environ["RANK"]) != 0:
            return 0
    else:
        report = _launch(cfg, "gloo" if args.force_cpu else "auto")
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
