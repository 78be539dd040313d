"""nbval ignores deprecation warnings from installed packages, and nothing else."""
from __future__ import annotations

from pathlib import Path

import nbformat

from hybridpar.book.nbval_warnings import strip_dependency_warnings
from tests.test_labs import run_nbval

DEP = "/x/lib/python3.11/site-packages/transformers/modeling.py"


def _notebook(tmp_path: Path, source: str, stored: str) -> Path:
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored)]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "warns.ipynb"
    nbformat.write(nb, path)
    return path


def test_strip_keeps_everything_but_dependency_deprecations() -> None:
    text = (f"{DEP}:12: FutureWarning: `past_key_values` is deprecated\n  return forward(x)\n"
            f"{DEP}:40: DeprecationWarning: old\n  y = old()\n"
            "/work/main/hybridpar/x.py:3: FutureWarning: ours\n  z()\n"
            f"{DEP}:7: UserWarning: not a deprecation\n  w()\n"
            "a real error line\n")
    assert strip_dependency_warnings(text) == (
        "/work/main/hybridpar/x.py:3: FutureWarning: ours\n  z()\n"
        f"{DEP}:7: UserWarning: not a deprecation\n  w()\n"
        "a real error line\n")


def test_nbval_passes_a_dependency_deprecation(tmp_path: Path) -> None:
    src = ("import warnings\nwarnings.warn_explicit('old API is deprecated', FutureWarning, "
           f"{DEP!r}, 12)\nprint(42)")
    proc = run_nbval(_notebook(tmp_path, src, "42\n"))
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_nbval_still_fails_on_other_stderr(tmp_path: Path) -> None:
    src = "import sys\nsys.stderr.write('something went wrong\\n')\nprint(42)"
    proc = run_nbval(_notebook(tmp_path, src, "42\n"))
    assert proc.returncode != 0 and "1 failed" in proc.stdout, proc.stdout[-3000:]
