"""hybridpar.distributed.launcher: results by rank, failures and hangs end every rank, bad input fails early."""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import types
from pathlib import Path

import psutil
import pytest
import torch

import hybridpar.distributed.launcher as launcher_mod
from hybridpar.distributed.launcher import (
    LaunchTimeoutError,
    RankFailedError,
    current_device,
    is_torchrun,
    launch,
    resolve_backend,
    run_torchrun,
)
from tests import launcher_workers as workers
from tests.torchrun_util import run_under_torchrun

ROOT = Path(__file__).resolve().parents[1]


def _rank_processes() -> list[psutil.Process]:
    """Live spawned children of this process (the multiprocessing resource tracker is not one)."""
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(p.cmdline()):
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _assert_no_survivors(pid_dir: Path, started: int) -> None:
    """No rank is alive; at least ``started`` ranks had recorded their pid (the rest may have been
    killed before getting that far on a slow machine)."""
    pids = [int(f.read_text()) for f in pid_dir.glob("rank*.pid")]
    assert len(pids) >= started
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    assert _rank_processes() == []


def test_results_ordered_by_rank_over_repeated_launches():
    fds = []
    for nprocs in (1, 2, 4):
        out = launch(workers.sum_of_ranks, nprocs)
        assert [o["rank"] for o in out] == list(range(nprocs))
        for o in out:
            assert o["world"] == nprocs
            assert o["sum"] == nprocs * (nprocs - 1) / 2
            assert o["env"] == {"MASTER_ADDR": "127.0.0.1", "RANK": str(o["rank"]),
                                "WORLD_SIZE": str(nprocs), "LOCAL_RANK": str(o["rank"])}
            assert o["threads"] == max(1, (os.cpu_count() or 1) // nprocs)
            assert o["backend"] == resolve_backend("auto", nprocs)
        assert _rank_processes() == []
        fds.append(psutil.Process().num_fds())
    assert fds[-1] == fds[0], f"file descriptors leak across launches: {fds}"


def test_rank_exception_becomes_rank_failed_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        launch(workers.raise_on, 2, 1, pid_dir=str(tmp_path))
    assert time.monotonic() - start < 30
    err = info.value
    assert err.rank == 1 and err.exitcode is None
    assert "ValueError: deliberate failure on rank 1" in err.remote_traceback
    assert "launcher_workers.py" in err.remote_traceback
    assert str(err).startswith("rank 1 failed") and "deliberate failure on rank 1" in str(err)
    _assert_no_survivors(tmp_path, 2)


def test_silent_death_is_reported_with_exit_code(tmp_path):
    start = time.monotonic()
    with pytest.raises(RankFailedError) as info:
        launch(workers.exit_on, 2, 0, 3, pid_dir=str(tmp_path))
    assert time.monotonic() - start < 30
    # rank 1's all-reduce fails too, but only after rank 0 died: rank 0 is the root cause.
    assert info.value.rank == 0 and info.value.exitcode == 3
    assert "rank 0 exited with code 3" in str(info.value)
    _assert_no_survivors(tmp_path, 2)


def test_hang_becomes_launch_timeout_error(tmp_path):
    start = time.monotonic()
    with pytest.raises(LaunchTimeoutError) as info:
        launch(workers.hang_on, 2, 1, pid_dir=str(tmp_path), timeout=5)
    assert time.monotonic() - start < 5 + 15
    assert info.value.ranks == [0, 1] and info.value.timeout == 5
    assert "5 s" in str(info.value) and "collective" in str(info.value)
    _assert_no_survivors(tmp_path, 0)


def test_keyboard_interrupt_kills_every_rank(tmp_path):
    def interrupt_once_ranks_run():
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob("rank*.pid")) and time.monotonic() < deadline:
            time.sleep(0.05)
        # Sent from this thread, the signal may be delivered to it rather than to the main thread,
        # as in a Jupyter kernel: the launcher must still notice it promptly.
        os.kill(os.getpid(), signal.SIGINT)

    # A process started in the background by a non-interactive shell inherits SIGINT as ignored, and
    # Python then installs no KeyboardInterrupt handler: install it, as an interactive kernel has it.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt_once_ranks_run, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            launch(workers.hang_on, 1, 0, pid_dir=str(tmp_path), timeout=300)
    finally:
        signal.signal(signal.SIGINT, previous)
    _assert_no_survivors(tmp_path, 1)


def test_unpicklable_return_value_names_the_rank():
    with pytest.raises(RankFailedError, match="cannot be pickled") as info:
        launch(workers.unpicklable_result, 1)
    assert info.value.rank == 0 and "rank 0 returned a function" in info.value.remote_traceback


def test_quiet_silences_rank_output_and_quiet_false_shows_it(capfd):
    assert launch(workers.print_and_return, 1, "hello-from-rank") == ["hello-from-rank"]
    captured = capfd.readouterr()
    assert "hello-from-rank" not in captured.out + captured.err
    launch(workers.print_and_return, 1, "hello-from-rank", quiet=False)
    captured = capfd.readouterr()
    assert "hello-from-rank" in captured.out and "hello-from-rank" in captured.err


def test_port_taken_between_probe_and_bind_is_retried(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = [taken.getsockname()[1]]
        original = launcher_mod.free_port
        monkeypatch.setattr(launcher_mod, "free_port", lambda: ports.pop() if ports else original())
        out = launch(workers.sum_of_ranks, 1)
    assert ports == [] and out[0]["world"] == 1


def _interactive_fn():
    pass


_interactive_fn.__module__ = "__main__"


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: launch(workers.sum_of_ranks, 0), ValueError, "nprocs must be an int >= 1"),
        (lambda: launch(workers.sum_of_ranks, 2.0), ValueError, "nprocs must be an int"),
        (lambda: launch(workers.sum_of_ranks, 2, timeout=0), ValueError, "timeout must be"),
        (lambda: launch(workers.sum_of_ranks, 2, backend="mpi"), ValueError, "backend must be one of"),
        (lambda: launch(workers.sum_of_ranks, torch.cuda.device_count() + 1, backend="nccl"), ValueError,
         r"needs one GPU per rank.*visible.*backend='gloo'"),
        (lambda: launch(lambda: 1, 2), ValueError, "define the worker in an importable module"),
        (lambda: launch(_interactive_fn, 2), ValueError, "interactive session.*importable module"),
        (lambda: launch(workers.sum_of_ranks, 2, threading.Lock()), ValueError, "arguments for fn cannot be pickled"),
    ],
    ids=["nprocs0", "nprocs-float", "timeout0", "backend", "nccl-too-few-gpus", "lambda", "notebook-fn", "bad-arg"],
)
def test_bad_input_fails_before_spawning(call, error, match, monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # as in a notebook: no __file__
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with pytest.raises(error, match=match):
        call()
    assert {p.pid for p in psutil.Process().children(recursive=True)} == before


def test_backend_resolution_and_device_outside_ranks():
    assert resolve_backend("auto", torch.cuda.device_count() + 1) == "gloo"
    assert resolve_backend("gloo", 64) == "gloo"
    if torch.cuda.device_count() == 0:
        assert resolve_backend("auto", 1) == "gloo"
    assert current_device() == torch.device("cpu")


def test_run_torchrun_outside_torchrun_says_what_to_use(monkeypatch):
    for var in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(var, raising=False)
    assert not is_torchrun()
    with pytest.raises(RuntimeError, match="hybridpar.launch"):
        run_torchrun(workers.sum_of_ranks)


def test_run_torchrun_under_torchrun():
    proc = run_under_torchrun(2, "tests/torchrun_script.py", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0][len("RESULT "):])
    assert out["rank"] == 0 and out["world"] == 2 and out["sum"] == 1.0
    assert out["backend"] == ("nccl" if torch.cuda.device_count() >= 2 else "gloo")


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_all_reduce_on_two_gpus():
    out = launch(workers.sum_of_ranks, 2, backend="nccl")
    assert [o["sum"] for o in out] == [1.0, 1.0]
    assert [o["device"] for o in out] == ["cuda:0", "cuda:1"]
    assert {o["backend"] for o in out} == {"nccl"}
    assert resolve_backend("auto", 2) == "nccl"
