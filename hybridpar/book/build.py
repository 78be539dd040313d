"""Build the Jupyter Book strictly, and tell whether the built HTML is older than its sources.

``python -m hybridpar.book build`` (what ``make book`` runs) calls :func:`build_book`:
``jupyter-book build . -W -n --keep-going`` with the repository on ``PYTHONPATH`` (so the
kernels that execute the chapters import this checkout) and ``HF_HUB_OFFLINE=1``. Any warning,
broken reference or failing cell fails the build; the execution reports of failed notebooks
(``_build/html/reports/*.err.log``) are kept and printed.

A successful build writes ``_build/html/.hybridpar-build`` with the build time; :func:`is_stale`
compares it with the newest source file, so ``tests/test_book.py`` rebuilds only when needed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAMP = Path("_build/html/.hybridpar-build")
# Everything the rendered book depends on. Tests, benchmarks and CI scripts are not inputs.
SOURCE_GLOBS = (
    "_config.yml", "_toc.yml", "*.md", "*.bib", "chapters/**/*", "labs/**/*.ipynb",
    "_assets/**/*", "hybridpar/**/*.py",
)


@dataclass(frozen=True)
class BuildResult:
    returncode: int
    seconds: float
    html: Path
    error_logs: list[Path]

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def newest_source_mtime(root: Path = ROOT) -> float:
    """The latest modification time among the book's sources."""
    times = [p.stat().st_mtime for pattern in SOURCE_GLOBS for p in root.glob(pattern) if p.is_file()]
    return max(times, default=0.0)


def is_stale(root: Path = ROOT) -> bool:
    """True when there is no successful build, or a source changed after it."""
    stamp = root / STAMP
    return not stamp.is_file() or stamp.stat().st_mtime < newest_source_mtime(root)


def build_env(root: Path = ROOT) -> dict[str, str]:
    """The environment for building and for executing notebooks: this checkout first on the path, hubs offline."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env["HF_HUB_OFFLINE"] = "1"
    return env


def build_book(root: Path = ROOT, quiet: bool = False) -> BuildResult:
    """Run the strict jupyter-book build in ``root``; on failure print the kept execution reports.

    Always a full build (``--all``, into an emptied ``_build/html``): an incremental Sphinx build would
    keep chapter outputs computed by older package code, and static files it copied before.
    """
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
           "build", ".", "-W", "-n", "--keep-going", "--all"]
    shutil.rmtree(root / "_build" / "html", ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, env=build_env(root),
                          stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                          text=True)
    seconds = time.perf_counter() - start
    html = root / "_build" / "html"
    logs = sorted((html / "reports").rglob("*.err.log")) if (html / "reports").is_dir() else []
    if proc.returncode == 0:
        (root / STAMP).write_text(f"built in {seconds:.1f} s\n")
    else:
        if quiet and proc.stdout:
            print(proc.stdout[-20000:], file=sys.stderr)
        for log in logs:
            print(f"\n===== execution report {log.relative_to(root)} =====\n{log.read_text()}", file=sys.stderr)
    return BuildResult(proc.returncode, seconds, html, logs)


def ensure_built(root: Path = ROOT) -> BuildResult | None:
    """Build if :func:`is_stale`; returns the result, or ``None`` when the existing build is current."""
    if not is_stale(root):
        return None
    return build_book(root, quiet=True)
