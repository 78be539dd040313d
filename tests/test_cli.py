"""The hybridpar command: subcommands, and configuration errors as one line with exit status 2."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hybridpar.cli import main
from tests.torchrun_util import run_under_torchrun


@pytest.mark.parametrize("argv,fix", [
    (["generate", "--tensor-parallel-size", "3"], "valid tensor_parallel_size values are 1, 2, 4, 8"),
    (["generate", "--token-parallel-size", "2", "--data-parallel-size", "2"], "mutually exclusive"),
    (["generate", "--model", "/no/such/checkpoint"], "qwen2-tiny"),
    (["generate", "--max-tokens", "0"], "max_tokens must be an int >= 1"),
])
def test_a_configuration_error_is_one_line_and_exit_2(argv: list[str], fix: str, capfd: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hybridpar: error: ") and fix in err[0], err


def test_debug_shows_the_traceback(capfd: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit, match="2"):
        main(["--debug", "generate", "--tensor-parallel-size", "3"])
    assert "Traceback" in capfd.readouterr().err


@pytest.mark.parametrize("argv", [["verify", "model", "--tp", "3"], ["generate", "--bogus"],
                                  ["verify", "tknp", "--token-parallel-size", "2", "--data-parallel-size", "2"]])
def test_subcommands_report_bad_arguments_in_one_line(argv: list[str], capfd: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capfd.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and ": error: " in err[0], err


@pytest.mark.slow
def test_under_torchrun_rank_0_alone_prints_the_error() -> None:
    proc = run_under_torchrun(2, "-m", "hybridpar", "generate", "--tensor-parallel-size", "3", "--force-cpu")
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("hybridpar: error:")]
    assert proc.returncode != 0 and len(ours) == 1, proc.stdout + proc.stderr
    frames = [x for x in (proc.stdout + proc.stderr).splitlines() if x.strip().startswith("File ")]
    assert not any("/hybridpar/" in x for x in frames), frames  # torchrun's own summary may follow; ours has no traceback


@pytest.mark.slow
def test_python_m_hybridpar_generates_text() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "hybridpar", "generate", "--prompt", "The radix cache",
                           "--max-tokens", "6"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'The radix cache' -> '" in proc.stdout and "(length, 0 prompt tokens from the radix cache)" in proc.stdout
