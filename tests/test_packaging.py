"""The conda environment and pyproject.toml declare the same dependencies."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _norm(req: str) -> str:
    """Canonical form of a requirement string: lower-case name, no spaces."""
    name, rest = re.match(r"([A-Za-z0-9_.\-]+)(.*)", req.strip()).groups()
    return re.sub(r"[-_.]+", "-", name).lower() + rest.replace(" ", "")


def _pyproject_requirements() -> set[str]:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(meta["dependencies"])
    for extra in meta["optional-dependencies"].values():
        reqs.extend(extra)
    return {_norm(r) for r in reqs}


def _environment_requirements() -> set[str]:
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = lines.index("  - pip:") + 1
    reqs = set()
    for line in lines[start:]:
        item = line.strip()
        if not item.startswith("- ") or item == "- -e .":
            continue
        reqs.add(_norm(item[2:]))
    return reqs


def test_environment_yml_matches_pyproject() -> None:
    py, env = _pyproject_requirements(), _environment_requirements()
    assert py == env, f"only in pyproject: {sorted(py - env)}; only in environment.yml: {sorted(env - py)}"


def test_torch_is_never_pinned_to_a_cuda_pulling_release() -> None:
    # A bare `torch` or an open-ended pin in an extra would make pip fetch the newest CUDA build.
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_reqs = [r for r in meta["dependencies"] if _norm(r).startswith("torch")]
    assert torch_reqs == ["torch>=2.4"], torch_reqs
    for extra, reqs in meta["optional-dependencies"].items():
        assert not any(_norm(r).startswith("torch") for r in reqs), extra


@pytest.mark.parametrize("target", ["book", "test"])
def test_makefile_targets_do_their_own_setup(target: str) -> None:
    text = (ROOT / "Makefile").read_text()
    assert re.search(rf"^{target}: venv$", text, re.M), f"`make {target}` must depend on venv"
    assert "--system-site-packages" in text  # an installed torch (Colab, clusters) is kept
