"""Re-create ``_assets/vendor/``: the browser code the static book needs, fetched once from npm.

The book must work with no network, so nothing may come from a CDN. Two npm packages are
vendored and committed (about 4 MB together):

* ``@jupyter-widgets/html-manager``: ``dist/embed.js``, the standalone embedder that renders the
  widget state stored in a page (core widgets only, no AMD loader needed), plus the Font Awesome
  web fonts it references (woff2/woff only; browsers pick those first).
* ``mathjax`` 3: ``es5/tex-chtml-full.js`` (every TeX extension built in, so nothing is
  autoloaded) and its CHTML woff-v2 fonts.

Run ``python -m hybridpar.book vendor`` to refresh them after changing a version below, then
rebuild the book and run ``tests/test_book.py`` (it checks that no page loads anything remote).
"""
from __future__ import annotations

import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

HTML_MANAGER = "@jupyter-widgets/html-manager@1.0.15"  # the embedder of ipywidgets 8.1
MATHJAX = "mathjax@3.2.2"
WIDGET_FONT_SUFFIXES = (".woff2", ".woff")


def _npm_pack(spec: str, workdir: Path) -> Path:
    """Download ``spec`` with ``npm pack`` and unpack it; returns the ``package/`` folder."""
    if shutil.which("npm") is None:
        raise RuntimeError("npm is not installed; install Node.js (e.g. `apt-get install -y npm`) to vendor assets")
    name = subprocess.run(
        ["npm", "pack", spec, "--silent"], cwd=workdir, check=True, capture_output=True, text=True
    ).stdout.strip().splitlines()[-1]
    target = workdir / name.removesuffix(".tgz")
    with tarfile.open(workdir / name) as tar:
        tar.extractall(target, filter="data")
    return target / "package"


def vendor(root: Path) -> list[Path]:
    """Replace ``root/_assets/vendor`` with freshly packed files; returns the files written."""
    dest = root / "_assets" / "vendor"
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "widgets").mkdir(parents=True)
    (dest / "mathjax").mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        widgets = _npm_pack(HTML_MANAGER, Path(tmp))
        for f in (widgets / "dist").iterdir():
            if f.name in ("embed.js", "embed.js.LICENSE.txt") or f.suffix in WIDGET_FONT_SUFFIXES:
                shutil.copy2(f, dest / "widgets" / f.name)
        mathjax = _npm_pack(MATHJAX, Path(tmp))
        shutil.copy2(mathjax / "es5" / "tex-chtml-full.js", dest / "mathjax" / "tex-chtml-full.js")
        shutil.copy2(mathjax / "LICENSE", dest / "mathjax" / "LICENSE")
        shutil.copytree(mathjax / "es5" / "output" / "chtml" / "fonts" / "woff-v2",
                        dest / "mathjax" / "output" / "chtml" / "fonts" / "woff-v2")
    (dest / "VENDORED.txt").write_text(
        f"Vendored by `python -m hybridpar.book vendor` (hybridpar/book/vendor.py); do not edit by hand.\n"
        f"widgets/: {HTML_MANAGER} dist/embed.js (BSD-3-Clause; bundled licenses in embed.js.LICENSE.txt)\n"
        f"          and the Font Awesome 5 web fonts it references (SIL OFL 1.1).\n"
        f"mathjax/: {MATHJAX} es5/tex-chtml-full.js and its woff-v2 fonts (Apache-2.0, see mathjax/LICENSE).\n"
    )
    return sorted(p for p in dest.rglob("*") if p.is_file())
