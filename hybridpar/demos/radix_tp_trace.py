"""RadixAttention under TP, seen from every rank: the step plans each rank runs, and what it stores.

Every rank builds the TP model and serves the same shared-prefix workload with
:class:`~hybridpar.radix.scheduler.TPScheduler`, once per configuration (radix cache with LPM or
FCFS, no cache, ...). A small subclass records each step plan as the rank executes it: the kind of
step, the requests, the new tokens, the KV slots they are written to, and a checksum of what *this*
rank wrote there (its own KV heads, so the checksums differ between ranks while the slots agree).
Each rank returns a :class:`RankReport`; the parent gets them in rank order and prints. Ranks never
print.

    python -m hybridpar.demos.radix_tp_trace --tp 2      # plans of a tiny run, then the comparison

From a notebook::

    reports = run_tp_serving(tp=2, workload=SharedPrefixWorkload(4, 4, 256, 16, 4))
    print(format_ranks(reports)); print(format_serving(reports))
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hybridpar.demos.radix_demo import DemoConfig, check_config
from hybridpar.radix.mem_pool import kv_bytes_per_token
from hybridpar.core import StepPlan
from hybridpar.radix.model_runner import ModelRunner
from hybridpar.radix.scheduler import TPScheduler
from hybridpar.config import ArgumentParser, ServerArgs
from hybridpar.radix.workload import SharedPrefixWorkload

# name -> ServerArgs overrides; the run called "no cache" is the baseline for "prefill tokens saved".
DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "radix, LPM": {},
    "radix, FCFS": {"schedule_policy": "fcfs"},
    "no cache": {"disable_radix_cache": True},
}
BASELINE = "no cache"


@dataclass(frozen=True)
class PlanRecord:
    """One step plan as a rank executed it. ``k_checksum``: sum of this rank's last-layer keys at
    ``out_cache_loc`` after the forward (its own KV heads: differs between ranks; the last layer, since
    the copy-circuit checkpoints, ``qwen2-tiny-copy`` and ``llama-tiny``, wire the same circuit into every
    KV head of layer 0)."""

    kind: str
    rids: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    out_cache_loc: list[int]
    k_checksum: float

    def same_plan(self, other: PlanRecord) -> bool:
        """Equal in everything the scheduler decided (all fields but the checksum)."""
        return (self.kind, self.rids, self.prefix_lens, self.extend_lens, self.out_cache_loc) == \
            (other.kind, other.rids, other.prefix_lens, other.extend_lens, other.out_cache_loc)


class PlanRecordingRunner(ModelRunner):
    """A :class:`ModelRunner` that appends a :class:`PlanRecord` for every plan this rank executes."""

    def __init__(self, base: ModelRunner) -> None:
        super().__init__(base.model, base.backend, base.req_to_token_pool, base.kv_pool, base.device,
                         base.max_running_requests, base.use_cuda_graph)
        self.plans: list[PlanRecord] = []

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        logits = super().execute(plan)
        loc = torch.tensor(plan.out_cache_loc, dtype=torch.int64, device=self.device)
        k = self.kv_pool.get_key_buffer(self.kv_pool.layer_num - 1)[loc]
        self.plans.append(PlanRecord(plan.kind, list(plan.rids), list(plan.prefix_lens), list(plan.extend_lens),
                                     list(plan.out_cache_loc), round(float(k.double().sum()), 4)))
        return logits


class PlanRecordingScheduler(TPScheduler):
    """A :class:`TPScheduler` whose runner records every plan this rank executes (``plans``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.runner = PlanRecordingRunner(self.runner)
        self.plans = self.runner.plans


@dataclass
class ServingRun:
    """One configuration on one rank: rank 0's metrics (shipped to every rank), this rank's pool
    digest, the plans this rank executed, and the generated token ids in request order."""

    name: str
    pool_tokens: int
    metrics: dict[str, Any]
    digest: dict[str, Any]
    plans: list[PlanRecord]
    outputs: list[list[int]]


@dataclass
class RankReport:
    """What one TP rank holds and did."""

    rank: int
    tp_size: int
    device: str
    total_kv_heads: int
    kv_heads: int  # stored by this rank
    kv_bytes_per_token: int  # on this rank
    runs: dict[str, ServingRun] = field(default_factory=dict)


def _metrics(m: Any) -> dict[str, Any]:
    return {**asdict(m), "cache_hit_rate": m.cache_hit_rate, "output_tokens_per_s": m.output_tokens_per_s,
            "total_tokens_per_s": m.total_tokens_per_s}


def serve_rank(workload: SharedPrefixWorkload, configs: dict[str, dict[str, Any]], shuffle: bool = True,
               page_size: int = 16, max_total_tokens: int = 8192, model_name: str | None = None,
               warm_up: bool = True) -> RankReport:
    """Runs on every rank: build the TP model, serve ``workload`` under each configuration."""
    import torch.distributed as dist

    from hybridpar.distributed.parallel_state import initialize_tensor_parallel
    from hybridpar.models.model_wrapper import TPRadixAttentionModelWrapper

    torch.set_num_threads(1)  # one core per rank: the ranks share a small machine
    initialize_tensor_parallel(dist.get_world_size())
    wrapper = TPRadixAttentionModelWrapper(model_name, page_size=page_size, max_total_tokens=max_total_tokens)
    requests = workload.requests(shuffle=shuffle)
    if warm_up:  # first calls are slow (allocator, kernels): keep them out of the timings
        sched = TPScheduler(wrapper, disable_radix_cache=True)
        sched.add_request(requests[0].prompt_ids, requests[0].max_new_tokens)
        sched.process_requests()
    cfg, heads = wrapper.config, wrapper.model.num_kv_heads_per_rank
    report = RankReport(wrapper.tp_group.rank_in_group, wrapper.tp_group.world_size, str(wrapper.device),
                        cfg.num_kv_heads, heads, kv_bytes_per_token(cfg.num_layers, heads, cfg.head_dim, wrapper.dtype))
    for name, overrides in configs.items():
        sched = PlanRecordingScheduler(wrapper, **overrides)
        rids = [sched.add_request(r.prompt_ids, r.max_new_tokens) for r in requests]
        results = sched.process_requests()
        report.runs[name] = ServingRun(name, sched.allocator.size, _metrics(sched.metrics), sched.pool_digest(),
                                       sched.plans, [results[r].output_ids for r in rids])
    return report


def check_serving(tp: int, workload: SharedPrefixWorkload, configs: dict[str, dict[str, Any]], page_size: int,
                  max_total_tokens: int, model_name: str | None) -> None:
    """Raise ValueError (naming the fix) before any process starts."""
    if not configs:
        raise ValueError("configs is empty; pass e.g. DEFAULT_CONFIGS")
    check_config(DemoConfig(model_name=model_name, tp=tp, workload=workload, page_size=page_size,
                            max_total_tokens=max_total_tokens))
    for name, overrides in configs.items():
        try:
            ServerArgs(**{"page_size": page_size, **overrides})
        except TypeError as err:
            raise ValueError(f"config {name!r}: {err}; the keys are ServerArgs fields") from None


def run_tp_serving(tp: int = 2, workload: SharedPrefixWorkload | None = None,
                   configs: dict[str, dict[str, Any]] | None = None, shuffle: bool = True, page_size: int = 16,
                   max_total_tokens: int = 8192, model_name: str | None = None, backend: str = "auto",
                   warm_up: bool = True, timeout: float = 300.0) -> list[RankReport]:
    """Launch ``tp`` ranks that serve ``workload`` under each of ``configs``; their reports, by rank.

    ``workload`` defaults to 4 groups x 4 prompts (64-token system prompts, 16-token questions,
    16 output tokens); ``configs`` to :data:`DEFAULT_CONFIGS`.
    """
    from hybridpar.distributed.launcher import launch

    workload = workload or SharedPrefixWorkload(4, 4, 64, 16, 16)
    configs = dict(DEFAULT_CONFIGS if configs is None else configs)
    check_serving(tp, workload, configs, page_size, max_total_tokens, model_name)
    return launch(serve_rank, tp, workload, configs, shuffle, page_size, max_total_tokens, model_name, warm_up,
                  backend=backend, timeout=timeout)


# ---------------------------------------------------------------------------- formatting (parent only)
def slot_ranges(slots: list[int]) -> str:
    """``[16, 17, 18, 32, 33]`` -> ``"16-18, 32-33"``."""
    if not slots:
        return "-"
    runs, start, prev = [], slots[0], slots[0]
    for s in slots[1:]:
        if s != prev + 1:
            runs.append((start, prev))
            start = s
        prev = s
    runs.append((start, prev))
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in runs)


def plans_agree(reports: list[RankReport], name: str) -> bool:
    """Did every rank execute the same plans (same requests, lengths and slots) in run ``name``?"""
    first = reports[0].runs[name].plans
    return all(len(r.runs[name].plans) == len(first) and all(a.same_plan(b) for a, b in zip(first, r.runs[name].plans))
               for r in reports[1:])


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def format_plans(reports: list[RankReport], name: str, max_steps: int = 12) -> str:
    """The step plans of run ``name`` (from rank 0), with every rank's checksum of the keys it wrote.

    Columns: requests (rids), cached + new tokens per request, KV slots written, then ``K rN``: the
    sum of rank N's layer-0 keys at those slots.
    """
    plans = [r.runs[name].plans for r in reports]
    lines = [f"{'step':>4} {'kind':<7} {'requests':<10} {'cached+new':<16} {'KV slots':<18}"
             + "".join(f"{f'K r{r.rank}':>9}" for r in reports)]
    for i, p in enumerate(plans[0][:max_steps]):
        lens = ", ".join(f"{a}+{b}" for a, b in zip(p.prefix_lens, p.extend_lens))
        rids, slots = _clip(", ".join(map(str, p.rids)), 10), _clip(slot_ranges(p.out_cache_loc), 18)
        lines.append(f"{i:>4} {p.kind:<7} {rids:<10} {_clip(lens, 16):<16} {slots:<18}"
                     + "".join(f"{pr[i].k_checksum:>9.2f}" for pr in plans))
    if len(plans[0]) > max_steps:
        lines.append(f"... {len(plans[0]) - max_steps} more steps")
    lines.append(f"every rank ran the same {len(plans[0])} plans (requests, lengths, slots): "
                 f"{plans_agree(reports, name)}")
    return "\n".join(lines)


def format_ranks(reports: list[RankReport]) -> str:
    """One line per rank: the KV heads it stores and its bytes per token; then, per run, the pool size
    and whether the pool digests (free pages, free rows, req_to_token, written slots) agree across ranks."""
    lines = [f"rank {r.rank}: {r.kv_heads} of {r.total_kv_heads} KV heads, {r.kv_bytes_per_token} bytes of KV per "
             f"token" for r in reports]
    for name, run in reports[0].runs.items():
        same = all(r.runs[name].digest == run.digest for r in reports)
        lines.append(f"{name}: {run.pool_tokens}-token pools, identical on all {len(reports)} ranks: {same} "
                     f"({run.digest['num_filled']} slots written)")
    return "\n".join(lines)


def format_serving(reports: list[RankReport], workload: SharedPrefixWorkload, page_size: int = 16,
                   timings: bool = False) -> str:
    """Per run: hit rate vs the theoretical maximum, prompt tokens served from the cache, prefill
    tokens computed and saved against the no-cache run, tokens evicted; with ``timings``, wall time,
    throughput and the number of prefill + decode steps."""
    runs = reports[0].runs
    base = runs[BASELINE].metrics["prefill_tokens_computed"] if BASELINE in runs else None
    best = workload.theoretical_hit_rate(page_size)
    w = max(3, *(len(name) for name in runs))
    if timings:
        lines = [f"{'run':<{w}} {'wall':>8} {'output tok/s':>13} {'total tok/s':>12} {'steps':>8}"]
        for name, run in runs.items():
            m = run.metrics
            steps = f"{m['prefill_steps']}+{m['decode_steps']}"
            lines.append(f"{name:<{w}} {m['wall_s']:>6.2f} s {m['output_tokens_per_s']:>13.1f} "
                         f"{m['total_tokens_per_s']:>12.1f} {steps:>8}")
        return "\n".join(lines)
    lines = [f"{'run':<{w}} {'hit rate':>8} {'max':>6} {'cached/prompt':>14} {'computed':>9} {'saved':>6} "
             f"{'evicted':>8}"]
    for name, run in runs.items():
        m = run.metrics
        saved = base - m["prefill_tokens_computed"] if base is not None else "-"
        cached = f"{m['cached_prompt_tokens']}/{m['prompt_tokens']}"
        lines.append(f"{name:<{w}} {m['cache_hit_rate']:>8.3f} {best:>6.3f} {cached:>14} "
                     f"{m['prefill_tokens_computed']:>9} {saved:>6} {m['evicted_tokens']:>8}")
    same = all(run.outputs == next(iter(runs.values())).outputs for run in runs.values())
    lines.append(f"same generated tokens in every run: {same}")
    return "\n".join(lines)


def trace_verdict(reports: list[RankReport], workload: SharedPrefixWorkload, page_size: int = 16) -> str:
    """One sentence: do the ranks agree on every plan and pool, and what did the radix cache save."""
    runs = reports[0].runs
    agree = all(plans_agree(reports, name) for name in runs)
    pools = all(r.runs[name].digest == run.digest for name, run in runs.items() for r in reports)
    same_tokens = all(run.outputs == next(iter(runs.values())).outputs for run in runs.values())
    if not (agree and pools and same_tokens):
        what = [w for w, ok in (("step plans", agree), ("pool contents", pools), ("generated tokens", same_tokens))
                if not ok]
        return f"MISMATCH: the {' and '.join(what)} differ between ranks or runs."
    text = (f"all {len(reports)} ranks ran the same step plans and hold identical pools (only the KV heads differ, "
            f"as the checksums show), and every configuration generated the same tokens")
    if BASELINE in runs and len(runs) > 1:
        base = runs[BASELINE].metrics["prefill_tokens_computed"]
        best = max((r for n, r in runs.items() if n != BASELINE), key=lambda r: r.metrics["cache_hit_rate"])
        text += (f"; {best.name!r} reused {100 * best.metrics['cache_hit_rate']:.0f} % of prompt tokens (best possible "
                 f"{100 * workload.theoretical_hit_rate(page_size):.0f} %) and computed "
                 f"{base - best.metrics['prefill_tokens_computed']:,} fewer prefill tokens than no cache")
    return text + "."


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--model-name", default=None, help="built-in name, local checkpoint or hub id")
    parser.add_argument("--backend", default="auto", choices=("auto", "gloo", "nccl"))
    args = parser.parse_args(argv)
    try:
        tiny = SharedPrefixWorkload(2, 2, 32, 8, 2)
        check_serving(args.tp, tiny, {"radix, LPM": {}}, 16, 8192, args.model_name)
    except ValueError as exc:
        parser.error(str(exc))
    from hybridpar.demos.explain import intro, model_line, verdict

    workload = SharedPrefixWorkload(4, 4, 256, 16, 4)
    print(intro("RadixAttention under TP, rank by rank", [
        model_line(args.model_name),
        f"TP {args.tp}: first {tiny.num_requests} requests with the radix cache (LPM), every step plan printed; then "
        f"{workload.num_requests} requests in {workload.num_groups} groups ({workload.system_len}-token shared "
        f"system prompts, random token ids) under each of {'; '.join(repr(n) for n in DEFAULT_CONFIGS)}"], [
        "the plans: rank 0 schedules, every rank executes the same plan (requests, cached+new tokens, KV slots); "
        "the K columns differ because each rank writes its own KV heads",
        "the pools: the same free pages, rows and written slots on every rank",
        "the serving table: hit rate against the best possible, and the prefill tokens the cache saved"]))
    reports = run_tp_serving(args.tp, tiny, {"radix, LPM": {}}, model_name=args.model_name, backend=args.backend,
                             warm_up=False)
    print(format_plans(reports, "radix, LPM"), "", format_ranks(reports), sep="\n")
    reports = run_tp_serving(args.tp, workload, model_name=args.model_name, backend=args.backend)
    print("", format_ranks(reports), "", format_serving(reports, workload),
          format_serving(reports, workload, timings=True), verdict(trace_verdict(reports, workload)), sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
