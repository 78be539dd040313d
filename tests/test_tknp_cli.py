"""Token-parallel configuration, layout and command line (the seed's flags)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hybridpar.config import ParallelConfig, ParallelConfigError
from hybridpar.distributed.parallel_state import compute_layout
from hybridpar.tknp.cli import main, parse_args
from tests.torchrun_util import run_under_torchrun

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("tp,tknp", [(1, 2), (1, 4), (2, 2), (2, 4)])
def test_layout_roots_form_the_tp_group(tp, tknp):
    layout = compute_layout(tp * tknp, tensor_parallel_size=tp, token_parallel_size=tknp)
    world = tp * tknp
    assert layout.groups["tknp"] == [list(range(t, world, tp)) for t in range(tp)]
    assert layout.groups["tp"] == [list(range(i, i + tp)) for i in range(0, world, tp)]
    assert layout.groups["dp"] == [[r] for r in range(world)]
    roots = [g[0] for g in layout.groups["tknp"]]
    assert roots in layout.groups["tp"]  # the roots (TKNP index 0) are exactly one TP group
    assert all(layout.coords(r)["tknp"] == r // tp and layout.coords(r)["tp"] == r % tp for r in range(world))


@pytest.mark.parametrize(("kwargs", "world", "message"), [
    (dict(token_parallel_size=2, data_parallel_size=2), None, "mutually exclusive"),
    (dict(token_parallel_size=2, data_parallel_size=2, enable_token_parallel=True), None, "mutually exclusive"),
    (dict(enable_token_parallel=True), None, "needs token_parallel_size >= 2"),
    (dict(token_parallel_size=1, enable_token_parallel=True, tensor_parallel_size=2), None, "needs token_parallel"),
    (dict(tensor_parallel_size=2, token_parallel_size=2), 8, "world size 8 does not match"),
    (dict(tensor_parallel_size=2, token_parallel_size=2), 2, "start 4 ranks"),
])
def test_validation_errors(kwargs, world, message):
    config = ParallelConfig(**kwargs)
    with pytest.raises(ParallelConfigError, match=message):
        config.check_world_size(world) if world else config.validate()


def test_world_size_includes_the_tknp_dimension():
    config = ParallelConfig(tensor_parallel_size=2, token_parallel_size=4, enable_token_parallel=True)
    assert config.check_world_size(8).world_size == 8 and config.token_parallel_enabled


@pytest.mark.parametrize(("argv", "world", "message"), [
    (["--token-parallel-size", "2", "--data-parallel-size", "2"], None, "mutually exclusive"),
    (["--enable-token-parallel"], None, "needs token_parallel_size >= 2"),
    (["--token-parallel-size", "2"], 3, "world size 3 does not match"),
    (["--tensor-parallel-size", "3", "--token-parallel-size", "2"], None, "valid tensor_parallel_size values"),
    (["--token-parallel-size", "0"], None, "token_parallel_size must be >= 1"),
    (["--token-parallel-size", "2", "--dtype", "fp8"], None, "dtype must be one of"),
    (["--token-parallel-size", "2", "--max-seq-len", "1000"], None, "--max-seq-len must be in [2, 512]"),
    (["--token-parallel-size", "two"], None, "invalid int value"),  # argparse's own errors: one line too
])
def test_cli_rejects_invalid_combinations_with_exit_2(argv, world, message, capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(argv + ["--force-cpu"], world_size=world)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m hybridpar.tknp.cli: error: ") and message in err[0], err


@pytest.mark.parametrize(("argv", "message"), [
    (["--prompt", ""], "prompt 0 is empty"),
    (["--prompt", "Hi", "--prompt", "word " * 80], "prompt 1 ("),  # 80+ tokens + 16 new > --max-seq-len 64
    (["--prompt", "Hi", "--memory-budget-mb", "11.7"], "raise --memory-budget-mb"),  # the weights leave no KV page
])
def test_bad_prompts_are_one_line_and_exit_2_before_any_rank_starts(argv, message, capsys, monkeypatch):
    import hybridpar.distributed.launcher as launcher

    def no_spawn(*args, **kwargs):
        raise AssertionError("a rank was spawned for a request the parent could have rejected")

    monkeypatch.setattr(launcher, "launch", no_spawn)
    with pytest.raises(SystemExit) as info:
        main(["--token-parallel-size", "2", "--force-cpu", "--max-seq-len", "64", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and message in err[0], err


def test_run_demo_raises_before_spawning(monkeypatch):
    import hybridpar.distributed.launcher as launcher
    from hybridpar.tknp.cli import run_demo

    monkeypatch.setattr(launcher, "launch", lambda *a, **k: pytest.fail("spawned ranks"))
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        run_demo(prompts=[""], force_cpu=True)
    with pytest.raises(ValueError, match="exceed --max-seq-len 32"):
        run_demo(prompts=["Hi", "a long prompt " * 10], max_seq_len=32, force_cpu=True)
    with pytest.raises(ParallelConfigError, match="mutually exclusive"):
        run_demo(token_parallel_size=2, data_parallel_size=2)


def test_cli_flags_map_to_the_setup():
    args, setup = parse_args(["--tensor-parallel-size", "2", "--token-parallel-size", "2", "--enable-token-parallel",
                              "--model-name", "llama-tiny", "--force-cpu", "--memory-budget-mb", "1.5"], world_size=4)
    assert (setup.tensor_parallel_size, setup.token_parallel_size, setup.data_parallel_size) == (2, 2, 1)
    assert setup.model_name == "llama-tiny" and setup.memory_budget_bytes == 1_500_000 and args.force_cpu


def test_module_entry_point_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "hybridpar.tknp.cli", "--token-parallel-size", "2",
                           "--data-parallel-size", "2", "--force-cpu"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "mutually exclusive" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_tknp2_demo_and_dp2_under_torchrun_give_the_same_text(capsys):
    """`python -m hybridpar.tknp.cli` on 2 gloo ranks (hybridpar.launch): the worker holds no weights and
    attends. Then `torchrun -m hybridpar.demos.tknp_demo` with DP 2 (two full replicas) on the same prompts
    produces the same completions."""
    flags = ["--model-name", "qwen2-tiny", "--force-cpu", "--max-new-tokens", "4", "--max-seq-len", "64", "--json"]
    assert main(["--token-parallel-size", "2", "--enable-token-parallel", *flags]) == 0
    lines = capsys.readouterr().out.splitlines()
    result = json.loads(lines[-1])
    assert lines[0].startswith("TP 1 x TKNP 2 x DP 1") and any("[tknp rank 1]" in line for line in lines)
    root, worker = result["ranks"]
    assert root["param_bytes"] > 0 and worker["param_bytes"] == 0 and worker["parameter_objects"] == 0
    assert worker["worker_new_tokens"] > 0 and sorted(set(result["placement"])) == [0, 1]
    # The "attended" column is filled for the root too: it attends for the requests placed on it.
    table = lines[lines.index(next(line for line in lines if line.startswith("rank role"))) + 1:][:2]
    attended = [int(row.split()[-1].replace(",", "")) for row in table]
    assert [row.split()[1] for row in table] == ["root", "attention"] and min(attended) > 0
    assert attended[1] == worker["worker_new_tokens"]

    proc = run_under_torchrun(2, "-m", "hybridpar.demos.tknp_demo",
                              "--data-parallel-size", "2", *flags, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()
    dp = json.loads(out[-1])
    # The torchrun demo explains itself: what ran, what to look for, the table, text completions, a verdict.
    assert out[0] == "== Token parallelism ==" and proc.stdout.count("== Token parallelism ==") == 1
    assert "hybridpar/qwen2-tiny, a 2.9M-parameter Qwen2 trained on this book" in proc.stdout
    assert "TP 1 x TKNP 1 x DP 2 on 2 ranks" in proc.stdout and dp["completions"] == result["completions"]
    replies = [line for line in out if line.startswith("[replica ")]
    assert len(replies) == 4 and all(" -> " in line and "'" not in line.split(" -> ")[1][:1] for line in replies)
    verdict = " ".join(proc.stdout[proc.stdout.index("verdict:"):].split())
    assert verdict.startswith("verdict: data parallelism: each of the 2 replicas holds all 11.1 MiB of weights")
    assert dp["placement"] == [0, 1, 0, 1]  # round-robin over the replicas
    assert [r["param_bytes"] for r in dp["ranks"]] == [root["param_bytes"]] * 2  # every replica holds all weights


def test_measured_memory_tp_dp_tknp_on_two_ranks():
    """One launch builds TP 2, DP 2 and TKNP 2 with the same per-rank budget: the worker holds no weights
    and the most KV; TKNP caches more distinct tokens than DP; every total is what memory.py predicts."""
    from hybridpar.tknp.cli import format_memory, measure_memory

    tp, dp, tknp = measure_memory("qwen2-tiny", num_ranks=2, memory_budget_bytes=16 << 20, max_seq_len=64)
    assert (tp.label, dp.label, tknp.label) == ("TP2", "DP2", "TKNP2")
    for layout in (tp, dp, tknp):
        assert layout.kv_tokens_total == layout.predicted().kv_tokens_total > 0
    root, worker = tknp.reports
    assert worker.param_bytes == 0 and worker.parameter_objects == 0 and root.param_bytes == dp.reports[0].param_bytes
    assert worker.capacity.num_tokens > root.capacity.num_tokens == dp.reports[0].capacity.num_tokens
    assert tknp.kv_tokens_total > dp.kv_tokens_total
    assert "distinct KV tokens" in format_memory([tp, dp, tknp])
