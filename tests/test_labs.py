"""The labs: their structure as committed, and nbval re-running them against their stored outputs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from hybridpar.book.build import ROOT, build_env
from hybridpar.book.run_labs import (
    INSTALL_TAG,
    check_lab,
    execute_lab,
    install_cell_source,
    min_gpus,
    repository_url,
    sync_install_cell,
)
from hybridpar.viz.static import KERNEL_ONLY_TAG, kernel_only_calls

LABS = sorted((ROOT / "labs").glob("*.ipynb"))
NBVAL_CELL_TIMEOUT = 120


def _read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def test_there_are_labs() -> None:
    assert LABS, "labs/ has no notebooks"


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.name)
def test_lab_structure(lab: Path) -> None:
    nb = _read(lab)
    assert check_lab(nb, repository_url()) == []
    title, install = nb.cells[0], nb.cells[1]
    assert title.cell_type == "markdown" and title.source.startswith("# Lab "), "the title comes first"
    assert install.cell_type == "code" and INSTALL_TAG in install.metadata["tags"], "the install cell is second"
    assert 'find_spec("hybridpar") is None' in install.source
    assert f"git+{repository_url()}" in install.source
    assert [i for i, c in enumerate(nb.cells) if INSTALL_TAG in c.metadata.get("tags", [])] == [1]
    if min_gpus(nb) > 0:
        assert nb.metadata["accelerator"] == "GPU"
        assert "needs-gpus" in title.source, "a GPU lab opens with the 'Needs GPUs' admonition"
    else:
        assert "runs-on-cpu" in title.source, "a CPU lab opens with the 'Runs on CPU' admonition"
    assert "the first cell installs" not in title.source, "the install cell is below the title now"
    for i, cell in enumerate(nb.cells):  # kernel-only widgets: code shown, inert controls left out of the book
        if cell.cell_type == "code" and kernel_only_calls(cell.source):
            assert KERNEL_ONLY_TAG in cell.metadata.get("tags", []), f"cell {i}"


def run_nbval(notebook: Path) -> subprocess.CompletedProcess[str]:
    """``pytest --nbval`` on one notebook, strict (not lax), with the committed sanitizer."""
    cmd = [
        sys.executable, "-m", "pytest", "--nbval", str(notebook),
        "--nbval-current-env", f"--nbval-cell-timeout={NBVAL_CELL_TIMEOUT}",
        "--nbval-sanitize-with", str(ROOT / "labs" / "nbval_sanitize.cfg"), "-p", "no:cacheprovider", "-q",
    ]
    return subprocess.run(cmd, cwd=ROOT, env=build_env(ROOT), capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("lab", LABS, ids=lambda p: p.name)
def test_lab_outputs_match_a_fresh_run(lab: Path) -> None:
    """nbval executes the lab and compares every output with the stored one, after the sanitizer."""
    proc = run_nbval(lab.relative_to(ROOT))
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]


def test_nbval_catches_a_changed_output(tmp_path: Path) -> None:
    cell = nbformat.v4.new_code_cell("print(6 * 7)", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="41\n")]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "stale.ipynb"
    nbformat.write(nb, path)
    proc = run_nbval(path)
    assert proc.returncode != 0 and "1 failed" in proc.stdout, proc.stdout[-3000:]


def test_sanitizer_masks_what_varies_between_runs() -> None:
    import re
    from configparser import ConfigParser

    config = ConfigParser()
    config.read(ROOT / "labs" / "nbval_sanitize.cfg")
    rules = [(re.compile(config[s]["regex"]), config[s]["replace"]) for s in config.sections()]

    def sanitize(text: str) -> str:
        for pattern, replace in rules:
            text = pattern.sub(replace, text)
        return text

    a = "tensor([1.], device='cuda:0') at 0x7f3a2b1c9d10 took 1.23 ms, 5,120 tokens/s on NVIDIA H100 80GB HBM3, nccl"
    b = "tensor([1.], device='cuda:1') at 0x55d0c0ffee00 took 987 us, 99 tokens/s on NVIDIA H200, nccl"
    assert sanitize(a) == sanitize(b)
    assert sanitize("rank 0 of 2, 4 heads") == "rank 0 of 2, 4 heads"  # plain numbers are compared


def _lab(*cells: nbformat.NotebookNode, gpus: int = 0) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook(cells=list(cells))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["hybridpar"] = {"min_gpus": gpus}
    return nb


def test_check_lab_reports_missing_install_cell_and_gpu_metadata(tmp_path: Path) -> None:
    url = repository_url()
    nb = _lab(nbformat.v4.new_markdown_cell("# A lab"), gpus=2)
    problems = check_lab(nb, url)
    assert any("install cell" in p for p in problems)
    assert any('"accelerator": "GPU"' in p for p in problems)

    sync_install_cell(nb, url)
    sync_install_cell(nb, url)  # idempotent: replaces, never stacks
    assert [c.cell_type for c in nb.cells] == ["markdown", "code"] and nb.cells[0].source == "# A lab"
    assert any("no stored outputs" in p for p in check_lab(nb, url))
    nb.cells[1].execution_count = 1
    nb.metadata["accelerator"] = "GPU"
    assert [c.source for c in nb.cells].count(install_cell_source(url)) == 1
    assert check_lab(nb, url) == []
    del nb.metadata["hybridpar"]
    assert any("min_gpus" in p for p in check_lab(nb, url))


def test_sync_moves_an_old_install_cell_below_the_title() -> None:
    """Labs written before the install cell moved had it above the title: sync moves it down, keeping
    its outputs, and rewrites a stale URL."""
    url = repository_url()
    old = nbformat.v4.new_code_cell(install_cell_source("https://github.com/old/place"), execution_count=1,
                                    metadata={"tags": [INSTALL_TAG]})
    nb = _lab(old, nbformat.v4.new_markdown_cell("# Lab 9: a title"), nbformat.v4.new_code_cell("x = 1"))
    nb.cells[2].execution_count = 2
    assert any("title" in p for p in check_lab(nb, url))
    sync_install_cell(nb, url)
    assert [c.source for c in nb.cells] == ["# Lab 9: a title", install_cell_source(url), "x = 1"]
    assert nb.cells[1].execution_count == 1 and check_lab(nb, url) == []
    untitled = _lab(nbformat.v4.new_code_cell("x = 1"))
    sync_install_cell(untitled, url)  # no title to go below: first, and check_lab asks for the title
    assert untitled.cells[0].source == install_cell_source(url)
    assert any("title" in p for p in check_lab(untitled, url))


def test_check_lab_wants_kernel_only_widgets_tagged_and_explained() -> None:
    url = repository_url()
    live = nbformat.v4.new_code_cell("from hybridpar.viz.radix_explorer import radix_playground\n\n"
                                     "radix_playground(pool_tokens=48)", execution_count=2)
    nb = _lab(nbformat.v4.new_markdown_cell("# Lab 9: a title"), live)
    sync_install_cell(nb, url)
    nb.cells[1].execution_count = 1
    problems = check_lab(nb, url)
    assert any("cell 2 (radix_playground)" in p and KERNEL_ONLY_TAG in p for p in problems)
    assert any("live kernel" in p for p in problems)
    live.metadata["tags"] = [KERNEL_ONLY_TAG]
    nb.cells.insert(2, nbformat.v4.new_markdown_cell("**Needs a live kernel.** The playground runs Python."))
    assert check_lab(nb, url) == []


def test_run_labs_refuses_a_gpu_lab_without_the_gpus(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import torch")])
    nb.metadata["hybridpar"] = {"min_gpus": 64}
    nb.metadata["accelerator"] = "GPU"
    path = tmp_path / "big.ipynb"
    nbformat.write(nb, path)
    with pytest.raises(RuntimeError, match="needs 64 GPU"):
        execute_lab(path)
    assert _read(path).cells[0].source == "import torch"  # untouched: nothing was executed or written


def test_install_cell_follows_config_url() -> None:
    source = install_cell_source("https://github.com/someone/fork")
    assert "git+https://github.com/someone/fork" in source
    compile(source, "<install cell>", "exec")
