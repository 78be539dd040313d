"""Every shell command in the README runs as written (the CPU ones; the rest say what they need)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LONG_TARGETS = ("make book", "make test", "make lock", "make test-latest", "make labs")


def readme_commands() -> list[str]:
    """Lines of the README's ```bash blocks (continuations joined), without comments."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def runnable(line: str) -> bool:
    """CPU commands: not the set-up targets this suite runs under, and none marked `# needs ...`."""
    return "# needs" not in line and not line.startswith(LONG_TARGETS)


def test_the_readme_marks_what_it_cannot_run_here() -> None:
    lines = readme_commands()
    assert any("hybridpar generate" in x for x in lines if runnable(x))
    for line in lines:
        if "Qwen/" in line or "nccl" in line or "--nproc-per-node 4" in line:
            assert "# needs" in line, f"say what this command needs: {line}"


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in readme_commands() if runnable(c)])
def test_readme_command_runs_as_written(command: str) -> None:
    if not (ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("the README's commands use .venv, which `make test` creates")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(command.split("#")[0], shell=True, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600, executable="/bin/bash")
    assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
