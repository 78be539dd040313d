"""A small Sphinx extension for the book (listed in ``_config.yml`` under ``sphinx.config.extensions``).

* Colab opens ``.ipynb`` files only. sphinx-book-theme adds launch buttons to every notebook page,
  including the chapters, which are MyST Markdown notebooks (``.md``), so their Colab link would
  point to a file Colab cannot open. The launch buttons are removed from pages whose source is not
  an ``.ipynb``: the labs keep them, the chapters do not.
* The ipywidgets embedder typesets every HTML widget with the MathJax 2 API
  (``MathJax.Hub.Queue``), which the book's MathJax 3 lacks: each widget would throw. A few lines of
  JavaScript forward that call to MathJax 3 before the embedder renders (it waits for ``load``).
"""
from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx


def drop_launch_buttons_from_text_notebooks(
    app: Sphinx, pagename: str, templatename: str, context: dict[str, Any], doctree: Any
) -> None:
    """``html-page-context`` handler: runs after sphinx-book-theme added its buttons (priority 501)."""
    if pagename not in app.env.all_docs or app.env.doc2path(pagename).endswith(".ipynb"):
        return
    buttons = context.get("header_buttons")
    if buttons:
        context["header_buttons"] = [b for b in buttons if b.get("label") != "launch-buttons"]


MATHJAX2_QUEUE_SHIM = """
document.addEventListener("DOMContentLoaded", function () {
  var mj = window.MathJax;
  if (mj && mj.startup && !mj.Hub) {
    mj.Hub = {Queue: function (job) {
      mj.startup.promise.then(function () { return mj.typesetPromise([job[2]]); });
    }};
  }
});
"""


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("html-page-context", drop_launch_buttons_from_text_notebooks, priority=600)
    app.add_js_file(None, body=MATHJAX2_QUEUE_SHIM)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
