"""Execute lab notebooks in place, storing their outputs and widget state for the book and nbval.

    python -m hybridpar.book.run_labs labs/01_roofline.ipynb [more.ipynb ...] [--timeout 120]
    python -m hybridpar.book.run_labs --sync-only labs/*.ipynb     # only rewrite the install cells

Labs are rendered from their stored outputs (the book does not execute them), and nbval re-runs
them against those outputs. So every lab is committed after a run of this tool, which:

1. writes the *install cell* right below the lab's title, from ``repository.url`` in
   ``_config.yml`` (the one place the URL lives): on Colab or in a fresh kernel it pip-installs
   hybridpar when it is not importable, elsewhere it does nothing;
2. checks the lab's metadata (:func:`check_lab`);
3. refuses to run a lab on a machine with fewer GPUs than its ``metadata.hybridpar.min_gpus``
   (run GPU labs on a GPU machine; mark their GPU-only cells ``nbval-skip`` for CPU CI);
4. executes it top to bottom in a fresh ``python3`` kernel with nbclient, with this checkout on
   ``PYTHONPATH``, ``HF_HUB_OFFLINE=1``, and ``store_widget_state=True`` so that every ipywidget
   renders in the static book; widget ids are then numbered in order, so that re-running an
   unchanged lab changes nothing.

Lab conventions (checked by :func:`check_lab` and ``tests/test_labs.py``): the first cell is the
title, a markdown cell that opens with ``# `` and holds a ``runs-on-cpu`` or ``needs-gpus``
admonition; the second is the install cell (tagged ``hybridpar-install``); notebook metadata
``kernelspec`` python3 and ``hybridpar: {"min_gpus": N}``; labs with ``N >= 1`` also carry Colab's
``"accelerator": "GPU"``. A cell that shows a kernel-only widget
(:data:`hybridpar.viz.static.KERNEL_ONLY_WIDGETS`) is tagged ``remove-output``, so that the book
shows no control that cannot work there, and the lab says that it needs a live kernel.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hybridpar.book.build import ROOT, build_env

INSTALL_TAG = "hybridpar-install"
WIDGET_STATE_MIME = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def repository_url(root: Path = ROOT) -> str:
    """``repository.url`` from ``_config.yml``."""
    import yaml

    config = yaml.safe_load((root / "_config.yml").read_text())
    try:
        return str(config["repository"]["url"]).rstrip("/")
    except (KeyError, TypeError):
        raise ValueError(f"{root / '_config.yml'} has no repository.url; add it (see the comment there)") from None


def install_cell_source(url: str) -> str:
    """The source of every lab's install cell (the cell below its title), for repository ``url``."""
    return (
        "# Installs hybridpar where it is missing (Colab, a fresh kernel); does nothing otherwise.\n"
        "# Generated from repository.url in _config.yml by `python -m hybridpar.book.run_labs`.\n"
        "import importlib.util, subprocess, sys\n"
        "\n"
        'if importlib.util.find_spec("hybridpar") is None:\n'
        f'    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+{url}"], check=True)'
    )


def is_title_cell(cell: Any) -> bool:
    """A markdown cell that opens with a level-1 heading (``# Lab n: ...``)."""
    return cell.cell_type == "markdown" and cell.source.lstrip().startswith("# ")


def is_install_cell(cell: Any) -> bool:
    return INSTALL_TAG in cell.get("metadata", {}).get("tags", [])


def sync_install_cell(nb: Any, url: str) -> None:
    """Make the cell right below the title the install cell for ``url``: an old install cell is
    rewritten and moved there (wherever it was), or a new one inserted. Without a title cell first,
    the install cell goes first (and :func:`check_lab` asks for the title)."""
    import nbformat

    source = install_cell_source(url)
    old = [c for c in nb.cells if is_install_cell(c)]
    cell = old[0] if old else nbformat.v4.new_code_cell(source, metadata={"tags": [INSTALL_TAG]})
    cell.cell_type, cell.source = "code", source
    nb.cells = [c for c in nb.cells if not is_install_cell(c)]
    nb.cells.insert(1 if nb.cells and is_title_cell(nb.cells[0]) else 0, cell)


def min_gpus(nb: Any) -> int:
    """GPUs the lab needs (``metadata.hybridpar.min_gpus``, 0 if absent)."""
    return int(nb.metadata.get("hybridpar", {}).get("min_gpus", 0))


def _has_widget_views(nb: Any) -> bool:
    return any(
        WIDGET_VIEW_MIME in out.get("data", {})
        for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
    )


def check_lab(nb: Any, url: str) -> list[str]:
    """Problems with a lab notebook as committed; an empty list when it is fine."""
    from hybridpar.viz.static import KERNEL_ONLY_TAG, kernel_only_calls

    problems = []
    cells = nb.cells
    if not cells or not is_title_cell(cells[0]):
        problems.append("the first cell is not the lab's title (a markdown cell that opens with '# ')")
    install = cells[1] if len(cells) > 1 else None
    if install is None or install.cell_type != "code" or not is_install_cell(install) \
            or install.source != install_cell_source(url):
        problems.append("the cell below the title is not the install cell for repository.url in _config.yml "
                        "(run `python -m hybridpar.book.run_labs --sync-only` on the lab)")
    if sum(map(is_install_cell, cells)) > 1:
        problems.append("the lab has more than one install cell")
    if nb.metadata.get("kernelspec", {}).get("name") != "python3":
        problems.append("kernelspec.name must be python3")
    if "min_gpus" not in nb.metadata.get("hybridpar", {}):
        problems.append('metadata.hybridpar.min_gpus is missing (0 for CPU labs)')
    elif min_gpus(nb) > 0 and nb.metadata.get("accelerator") != "GPU":
        problems.append('a GPU lab needs notebook metadata "accelerator": "GPU" (Colab picks a GPU runtime)')
    if _has_widget_views(nb) and not nb.metadata.get("widgets", {}).get(WIDGET_STATE_MIME, {}).get("state"):
        problems.append("the lab displays widgets but stores no widget state; re-run it with this tool")
    unexecuted = [i for i, c in enumerate(cells) if c.cell_type == "code" and c.source.strip()
                  and c.execution_count is None and "nbval-skip" not in c.metadata.get("tags", [])]
    if unexecuted:
        problems.append(f"code cells {unexecuted} have no stored outputs; run the lab with this tool")
    live = [(i, name) for i, c in enumerate(cells) if c.cell_type == "code" for name in kernel_only_calls(c.source)]
    untagged = [f"cell {i} ({name})" for i, name in live if KERNEL_ONLY_TAG not in cells[i].metadata.get("tags", [])]
    if untagged:
        problems.append(f"{', '.join(untagged)} show(s) a kernel-only widget, whose controls do nothing in the book: "
                        f"tag the cell {KERNEL_ONLY_TAG!r} (or show its precomputed twin instead)")
    if live and not any(c.cell_type == "markdown" and "live kernel" in c.source for c in cells):
        problems.append("the lab shows a kernel-only widget but never says that it needs a live kernel")
    return problems


def stable_widget_ids(nb: Any) -> Any:
    """``nb`` with its widget model ids (random UUIDs) replaced by ids numbered in creation order.

    The ids appear in the stored state, in references between models and in the outputs that
    display them; renumbering all of them keeps re-runs of an unchanged lab diff-free.
    """
    import nbformat

    state = nb.metadata.get("widgets", {}).get(WIDGET_STATE_MIME, {}).get("state", {})
    text = json.dumps(nb)
    for i, model_id in enumerate(list(state)):
        text = text.replace(model_id, f"{i + 1:032x}")
    return nbformat.from_dict(json.loads(text))


def _available_gpus() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def execute_lab(path: Path, timeout: int = 120, root: Path = ROOT) -> float:
    """Sync the install cell, execute ``path`` in place with widget state stored; returns seconds."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    url = repository_url(root)
    sync_install_cell(nb, url)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    needed, available = min_gpus(nb), _available_gpus()
    if needed > available:
        raise RuntimeError(f"{path.name} needs {needed} GPU(s) (metadata.hybridpar.min_gpus) but this machine has "
                           f"{available}; run it on a GPU machine, or refresh only the install cell with --sync-only")
    nb.metadata.pop("widgets", None)
    client = NotebookClient(
        nb, timeout=timeout, kernel_name="python3", store_widget_state=True, record_timing=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute(env=build_env(root))
    seconds = time.perf_counter() - start
    nb = stable_widget_ids(nb)
    problems = check_lab(nb, url)
    if problems:
        raise RuntimeError(f"{path.name} ran but is not a valid lab: " + "; ".join(problems))
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hybridpar.book.run_labs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("labs", nargs="+", type=Path, help="lab notebooks (.ipynb) to execute in place")
    parser.add_argument("--timeout", type=int, default=120, help="seconds per cell (default 120)")
    parser.add_argument("--sync-only", action="store_true", help="only rewrite the install cell; do not execute")
    args = parser.parse_args(argv)
    import nbformat

    url = repository_url()
    for lab in args.labs:
        if lab.suffix != ".ipynb" or not lab.is_file():
            parser.error(f"{lab} is not a notebook file")
        if args.sync_only:
            nb = nbformat.read(lab, as_version=4)
            sync_install_cell(nb, url)
            nbformat.write(nb, lab)
            print(f"[hybridpar] {lab}: install cell -> git+{url}")
            continue
        seconds = execute_lab(lab, timeout=args.timeout)
        print(f"[hybridpar] {lab}: executed in {seconds:.1f} s, outputs and widget state stored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
