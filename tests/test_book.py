"""The book: its configuration, and the built HTML as a reader sees it in headless Chromium.

The browser tests build the book first when ``_build/html`` is missing or older than its sources
(``hybridpar.book.build.ensure_built``, the same build as ``make book``), serve it from a local
``http.server`` on 127.0.0.1, and block every request to any other host. They need Debian's
``/usr/bin/chromium`` (``apt-get install -y chromium``): without it they fail under CI (``CI=true``)
and are skipped elsewhere. Screenshots land in ``_build/screenshots/``.
"""
from __future__ import annotations

import functools
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from hybridpar.book.build import ROOT, ensure_built
from hybridpar.viz.static import KERNEL_ONLY_TAG, KERNEL_ONLY_WIDGETS, kernel_only_calls

CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WIDGET_VIEW = 'script[type="application/vnd.jupyter.widget-view+json"]'
WIDGET_VIEW_MIME = "application/vnd.jupyter.widget-view+json"


def toc_files() -> list[str]:
    """Every document of _toc.yml (root first), without suffix."""
    files = [TOC["root"]]
    for part in TOC.get("parts", []):
        for chapter in part.get("chapters", []):
            files.append(chapter["file"])
            files.extend(section["file"] for section in chapter.get("sections", []))
    return files


def source_of(doc: str) -> Path:
    matches = [p for p in (ROOT / f"{doc}.md", ROOT / f"{doc}.ipynb") if p.is_file()]
    assert len(matches) == 1, f"{doc} in _toc.yml must exist as exactly one of .md/.ipynb, found {matches}"
    return matches[0]


# ---------------------------------------------------------------- configuration (no build needed)

def test_config_keeps_launch_buttons_and_colab() -> None:
    assert CONFIG["sphinx"]["recursive_update"] is True, "without it html_theme_options drops the launch buttons"
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", CONFIG["repository"]["url"])
    assert CONFIG["html"]["use_repository_button"] is True
    assert CONFIG["sphinx"]["config"]["html_theme_options"]["use_download_button"] is True


def test_config_executes_chapters_but_not_labs() -> None:
    execute = CONFIG["execute"]
    assert execute["execute_notebooks"] == "force"
    assert isinstance(execute["timeout"], int) and 0 < execute["timeout"] <= 600
    assert "labs/*" in execute["exclude_patterns"]
    assert execute["allow_errors"] is False
    assert CONFIG["only_build_toc_files"] is True


def test_config_loads_nothing_from_a_cdn() -> None:
    sphinx = CONFIG["sphinx"]["config"]
    assert sphinx["html_static_path"] == ["_assets"]
    scripts = [*sphinx["nb_ipywidgets_js"], sphinx["mathjax_path"]]
    for script in scripts:
        assert "://" not in script
        assert (ROOT / "_assets" / script).is_file(), f"{script} is not vendored; run `python -m hybridpar.book vendor`"
    # jupyter-book adds every *.js under a top-level _static/ to every page (MathJax twice, etc.).
    assert not (ROOT / "_static").exists(), "put static files in _assets/, not _static/ (see _config.yml)"
    vendored = sum(p.stat().st_size for p in (ROOT / "_assets" / "vendor").rglob("*") if p.is_file())
    assert vendored < 6e6, f"vendored assets grew to {vendored / 1e6:.1f} MB"


def test_toc_lists_every_chapter_and_lab() -> None:
    listed = {str(source_of(doc).relative_to(ROOT)) for doc in toc_files()}
    present = {str(p.relative_to(ROOT)) for d in ("chapters", "labs") for p in (ROOT / d).glob("*")
               if p.suffix in (".md", ".ipynb")}
    assert present <= listed, f"not in _toc.yml (so never built): {sorted(present - listed)}"


@pytest.mark.parametrize("chapter", sorted((ROOT / "chapters").glob("*.md")), ids=lambda p: p.name)
def test_chapters_are_executable_myst_notebooks(chapter: Path) -> None:
    text = chapter.read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["kernelspec"]["name"] == "python3"
    assert header["jupytext"]["text_representation"]["format_name"] == "myst"
    assert "```{code-cell}" in text
    # Chapters show the package's code through literalinclude, never a pasted copy of it.
    for match in re.finditer(r"```\{literalinclude\} (\S+)\n:pyobject: (\w+)", text):
        source = (chapter.parent / match[1]).resolve()
        assert re.search(rf"^(def|class) {match[2]}\b", source.read_text(), re.M), match[0]
    assert not re.search(r"```(python|ipython3)\n(def|class) ", text), "show package code with literalinclude"


MAX_LISTING_LINES = 30  # a listing longer than this is split into pieces (:lines:, or smaller :pyobject:s)


def _pyobject_lines(source: str, dotted: str) -> list[str]:
    """The lines ``:pyobject: dotted`` shows (decorators included), as Sphinx's pyobject filter finds them."""
    import ast

    nodes, node = ast.parse(source).body, None
    for part in dotted.split("."):
        node = next(n for n in nodes if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part)
        nodes = node.body
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    return source.splitlines()[start - 1:node.end_lineno]


def literalinclude_listings(chapter: Path) -> list[tuple[str, list[str]]]:
    """``(what, lines shown)`` for every literalinclude of ``chapter`` (:pyobject:, :lines:, :start-at:/:end-at:)."""
    listings = []
    for match in re.finditer(r"```\{literalinclude\} (\S+)\n((?::[\w-]+:.*\n)*)", chapter.read_text()):
        opts = dict(re.findall(r":([\w-]+): (.*)", match[2]))
        source = (chapter.parent / match[1]).resolve().read_text()
        lines = _pyobject_lines(source, opts["pyobject"]) if "pyobject" in opts else source.splitlines()
        if "start-at" in opts:
            lines = lines[next(i for i, line in enumerate(lines) if opts["start-at"].strip('"') in line):]
            lines = lines[:next(i for i, line in enumerate(lines) if opts["end-at"].strip('"') in line) + 1]
        if "lines" in opts:
            keep = set()
            for part in opts["lines"].split(","):
                lo, _, hi = part.partition("-")
                keep.update(range(int(lo), int(hi or lo) + 1))
            lines = [line for i, line in enumerate(lines, 1) if i in keep]
        listings.append((f"{match[1]} {opts.get('pyobject', '')} {opts.get('lines', '')}".strip(), lines))
    return listings


COURSE_CHAPTERS = sorted((ROOT / "chapters").glob("0[1-7]_*.md"))


@pytest.mark.parametrize("chapter", COURSE_CHAPTERS, ids=lambda p: p.name)
def test_listings_are_short_pieces(chapter: Path) -> None:
    """Code comes in pieces a reader can hold: no literalinclude over MAX_LISTING_LINES lines."""
    long = [(what, len(lines)) for what, lines in literalinclude_listings(chapter) if len(lines) > MAX_LISTING_LINES]
    assert not long, f"split these listings (:lines: or a smaller :pyobject:): {long}"


def test_no_listing_appears_twice() -> None:
    seen: dict[str, str] = {}
    for chapter in COURSE_CHAPTERS:
        for what, _ in literalinclude_listings(chapter):
            assert what not in seen, f"{what} is listed in {seen[what]} and again in {chapter.name}: refer back"
            seen[what] = chapter.name


def test_every_chapter_opens_with_its_figure() -> None:
    """Chapters 1-7 show a figure drawn by the package (a plt.show() cell) before their first listing."""
    for chapter in COURSE_CHAPTERS:
        text = chapter.read_text()
        first_listing = text.find("```{literalinclude}")
        first_figure = text.find("plt.show()")
        assert 0 <= first_figure and (first_listing < 0 or first_figure < first_listing), chapter.name
        assert re.search(r"hybridpar\.viz\.(figures|perf_plots) import", text[:first_figure]), chapter.name


@pytest.mark.parametrize("lab", sorted((ROOT / "labs").glob("0[1-6]_*.ipynb")), ids=lambda p: p.name)
def test_labs_predict_then_run_and_solve(lab: Path) -> None:
    """A lab asks the learner to commit to a number or a choice (a ``my_guess = ...`` cell) before the
    cell that computes it, at least twice, and every exercise has a hidden solution."""
    import nbformat

    cells = nbformat.read(lab, as_version=4).cells
    guesses = [i for i, c in enumerate(cells) if c.cell_type == "code" and c.source.startswith("my_guess = ")]
    assert len(guesses) >= 2, f"{lab.name}: {len(guesses)} predict-then-run steps, want at least 2"
    for i in guesses:  # the real thing comes later, and shows the guess next to it
        assert any("my_guess" in c.source for c in cells[i + 1:] if c.cell_type == "code"), f"{lab.name} cell {i}"
    exercises = next(i for i, c in enumerate(cells) if c.cell_type == "markdown" and "## Exercises" in c.source)
    numbered = len(re.findall(r"^\d+\. ", cells[exercises].source, re.M))
    solutions = [c.source for c in cells[exercises + 1:] if c.source.lstrip("`").startswith("{dropdown} Solutions")]
    assert len(solutions) == 1, f"{lab.name}: the exercises need one hidden {{dropdown}} of solutions after them"
    assert len(re.findall(r"^\d+\. ", solutions[0], re.M)) == numbered, f"{lab.name}: one solution per exercise"


def notebook_of(doc: str) -> object:
    """The cells of a chapter (MyST Markdown, read as myst-nb reads it) or a lab."""
    import nbformat
    from myst_nb.core.read import read_myst_markdown_notebook

    path = source_of(doc)
    if path.suffix == ".md":
        return read_myst_markdown_notebook(path.read_text())
    return nbformat.read(path, as_version=4)


BOOK_NOTEBOOKS = [doc for doc in toc_files() if doc.startswith(("chapters/", "labs/"))]


@pytest.mark.parametrize("doc", BOOK_NOTEBOOKS)
def test_kernel_only_widgets_are_left_out_of_the_book(doc: str) -> None:
    """A widget whose controls call Python would show inert controls in the static book: its cell
    must be tagged remove-output (the code stays, the controls go), and the page must say that it
    needs a live kernel."""
    nb = notebook_of(doc)
    calls = [(i, name) for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
             for name in kernel_only_calls(cell.source)]
    for i, name in calls:
        assert KERNEL_ONLY_TAG in nb.cells[i].metadata.get("tags", []), \
            f"cell {i} shows {name}, whose controls do nothing without a kernel: tag it {KERNEL_ONLY_TAG}"
    if calls:
        prose = " ".join(c.source for c in nb.cells if c.cell_type == "markdown")
        assert "live kernel" in " ".join(prose.split()), "say that the left-out widget needs a live kernel"


def test_kernel_only_registry_names_real_functions_and_twins() -> None:
    """Each kernel-only widget sits next to its precomputed twin, and says that it needs a kernel."""
    import importlib

    assert set(KERNEL_ONLY_WIDGETS) == {"roofline_calculator", "collectives_widget", "shard_viewer",
                                        "radix_playground", "tknp_flow_widget"}
    for name, twin in KERNEL_ONLY_WIDGETS.items():
        module_name, _, twin_name = twin.rpartition(".")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, twin_name)) and "kernel" in getattr(module, name).__doc__
    assert kernel_only_calls("shard_viewer(model='tiny')\nx.radix_playground()") == ["shard_viewer", "radix_playground"]
    assert kernel_only_calls("from m import shard_viewer\nmy_shard_viewer()\nshard_explorer()") == []


# ---------------------------------------------------------------- the built book in Chromium

@dataclass
class PageReport:
    status: int
    errors: list[str] = field(default_factory=list)
    remote_requests: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def built_book() -> Path:
    result = ensure_built(ROOT)
    if result is not None:
        assert result.ok, (f"the book build failed (exit {result.returncode}); execution reports: "
                           f"{[str(p) for p in result.error_logs]}; run `make book` to see the warnings")
    return HTML


@pytest.fixture(scope="module")
def server(built_book: Path) -> Iterator[str]:
    class QuietHandler(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(built_book)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not CHROMIUM.exists():
        message = (f"headless Chromium is needed ({CHROMIUM}): `apt-get install -y chromium` and "
                   "`pip install -e .[test]` (for playwright)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser: object, url: str, theme: str | None = None) -> tuple[object, PageReport]:
    """Load ``url`` with every non-local request blocked; returns the page and what went wrong."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(120_000)  # generous: a loaded 2-core CI box parses the widget bundle slowly
    if theme:
        context.add_init_script(f"localStorage.setItem('mode', '{theme}')")
    page = context.new_page()
    report = PageReport(status=0)

    def route(r: object) -> None:
        if urlparse(r.request.url).hostname == "127.0.0.1" or r.request.url.startswith("data:"):
            r.continue_()
        else:
            report.remote_requests.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("pageerror", lambda exc: report.errors.append(f"page error: {exc}"))
    page.on("console", lambda msg: report.errors.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" else None)
    page.on("response", lambda resp: report.failed_requests.append(f"{resp.status} {resp.url}")
            if resp.status >= 400 else None)
    response = page.goto(url, wait_until="load")
    report.status = response.status
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:  # a busy CI machine can keep a widget-heavy page from going network-idle for long
        page.wait_for_load_state("networkidle", timeout=30_000)
    except PlaywrightTimeoutError:
        pass  # every request is still routed above: remote or failed ones fail the page's checks
    return page, report


def wait_for_widgets(page: object) -> int:
    """Wait (up to 90 s) until every widget view script has a rendered view; returns the number of views.

    Callers compare it with the views actually rendered, so a missing view fails with a count.
    """
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    views = page.locator(WIDGET_VIEW).count()
    if views:
        try:
            page.wait_for_function(
                f"document.querySelectorAll('.widget-subarea > .jupyter-widgets').length >= {views}",
                timeout=90_000,
            )
        except PlaywrightTimeoutError:
            pass
    return views


# Code the reader must read whole: listings and code cells (outputs may scroll). A line wider than its block
# is clipped behind a scroll bar; hybridpar.css wraps them instead.
WIDE_CODE_JS = """() => [...document.querySelectorAll('div[class*="highlight-python"] pre, .cell_input pre')]
  .filter(p => p.scrollWidth > p.clientWidth + 1)
  .map(p => p.innerText.split('\\n').reduce((a, b) => (a.length >= b.length ? a : b)).slice(0, 60))"""

# The first rendered figure precedes the first listing (literalinclude) in document order.
FIGURE_FIRST_JS = """() => {
  const img = document.querySelector('.cell_output img');
  const listing = document.querySelector('div[class*="highlight-python"]');
  return !!img && img.complete && img.naturalWidth > 0
    && (!listing || !!(img.compareDocumentPosition(listing) & Node.DOCUMENT_POSITION_FOLLOWING));
}"""

GLOSSARY_TERMS = ("TP", "TKNP", "all-reduce", "radix tree", "page", "KV cache", "RadixAttention", "roofline")
BIBLIOGRAPHY = ("SGLang", "2312.07104", "Megatron-LM", "PagedAttention", "v0.4", "DeepSeek-V3", "Helix",
                "MegaScale-Infer")


@pytest.mark.parametrize("doc", [*toc_files(), "search", "genindex"])
def test_page_loads_offline_and_renders(browser: object, server: str, doc: str) -> None:
    """Every page: HTTP 200, no JS error, nothing fetched from the network, every widget rendered;
    plus the checks specific to its kind (figures, Colab button, glossary terms, references)."""
    page, report = open_page(browser, f"{server}/{doc}.html")
    views = wait_for_widgets(page)
    text = page.inner_text("body")
    rendered = page.locator(".widget-subarea > .jupyter-widgets").count()
    images = page.locator(".cell_output img")
    figures = [images.nth(i).evaluate("img => img.complete && img.naturalWidth > 0") for i in range(images.count())]
    colab = page.locator('a[href^="https://colab.research.google.com/"]')
    colab_links = [colab.nth(i).get_attribute("href") for i in range(colab.count())]
    admonitions = {c for c in ("runs-on-cpu", "needs-gpus") if page.locator(f".admonition.{c}").count()}
    math = page.locator("mjx-container").count()
    terms = page.locator("dl.glossary dt").all_inner_texts()
    wide_code = page.evaluate(WIDE_CODE_JS)
    first_figure_before_listing = page.evaluate(FIGURE_FIRST_JS)
    page.context.close()

    assert report.status == 200
    assert report.remote_requests == [], "the book must not fetch anything from the network"
    assert report.failed_requests == []
    assert report.errors == []
    assert "Loading widget" not in text and "Error displaying widget" not in text
    assert rendered == views, f"{views - rendered} of {views} widgets did not render"
    assert wide_code == [], f"code wider than the page (clipped): {wide_code}"
    if doc in ("search", "genindex"):
        return
    source = source_of(doc).read_text()
    if "roofline_explorer(" in source:
        assert views >= 1
    if doc.startswith("labs/"):  # exactly the stored widget outputs the book keeps (kernel-only ones are left out)
        nb = notebook_of(doc)
        shown = sum(WIDGET_VIEW_MIME in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
                    and KERNEL_ONLY_TAG not in cell.metadata.get("tags", []) for out in cell.get("outputs", []))
        assert views == shown, f"{views} widget views in the page, {shown} widget outputs to show"
    if doc in BOOK_NOTEBOOKS and any(kernel_only_calls(c.source) for c in notebook_of(doc).cells):
        assert "live kernel" in " ".join(text.split()), "the page says which widget needs a live kernel"
    if "plt.show()" in source:
        assert figures and all(figures), "matplotlib figures missing or broken"
    if doc.startswith("chapters/0") and doc < "chapters/08":  # the opening figure comes before any listing
        assert first_figure_before_listing, "the chapter's figure must come before its first listing"
    if "$" in source and doc != "bibliography":
        assert math > 0, "MathJax did not typeset the page's math"
    repo = CONFIG["repository"]["url"].removeprefix("https://github.com/")
    if doc.startswith("labs/"):
        branch = CONFIG["repository"]["branch"]
        assert f"https://colab.research.google.com/github/{repo}/blob/{branch}/{doc}.ipynb" in colab_links
    else:
        assert colab_links == [], "Colab cannot open .md chapters: no launch button there"
    if doc.startswith(("chapters/", "labs/")):
        assert admonitions, "every chapter and lab says whether it runs on CPU or needs GPUs"
    if doc == TOC["root"]:
        assert admonitions == {"runs-on-cpu", "needs-gpus"}
        assert all(f"| {n} |" in source for n in range(1, 8)), "the course map lists chapters 1-7"
    if doc == "glossary":
        for term in GLOSSARY_TERMS:
            assert any(t.strip() == term for t in terms), f"glossary lacks {term}"
    if doc == "bibliography":
        for needle in BIBLIOGRAPHY:
            assert needle in text, f"bibliography lacks {needle}"


# Every widget view the embedder renders is a Lumino widget (class lm-Widget) with a class naming its kind.
# Controls are operated by kind; views that only show something are passed over. A view of any
# other kind fails the test until it is added here, so no control goes unchecked.
CONTROL_KINDS = {"widget-slider": "slider", "widget-dropdown": "dropdown", "widget-toggle-buttons": "toggle-buttons",
                 "widget-button": "button", "widget-toggle-button": "button", "widget-checkbox": "checkbox",
                 "widget-text": "text", "widget-textarea": "text", "widget-play": "play"}
PASSIVE_KINDS = ("widget-box", "widget-container", "widget-html", "widget-htmlmath", "widget-label", "widget-image",
                 "widget-output")
FIND_CONTROLS_JS = """([root, kinds, passive]) => {
  const found = [];
  for (const el of [root, ...root.querySelectorAll('.lm-Widget')]) {
    if (!el.checkVisibility() || el.parentElement.closest('[data-hp-control]')) continue;
    const kind = Object.keys(kinds).find(c => el.classList.contains(c));
    if (kind) {
      el.dataset.hpControl = String(found.length);
      found.push({kind: kinds[kind], label: el.innerText.trim().split('\\n')[0].slice(0, 40)});
    } else if (!passive.some(c => el.classList.contains(c))) {
      found.push({kind: 'unknown', label: el.className});
    }
  }
  return found;
}"""
# What the reader sees of a widget's output: every visible HTML view and image (a Stack renders only
# its selected child). The controls' own readouts and labels are not part of it.
SHOWN_JS = """root => [...root.querySelectorAll('.widget-html-content, .widget-htmlmath-content, img')]
  .filter(e => e.checkVisibility())
  .map(e => e.tagName === 'IMG' ? e.currentSrc.length + ':' + e.currentSrc.slice(-80) : e.innerHTML).join('\\n')"""


def operate(page: object, control: object, kind: str) -> str:
    """Do what a reader would do to ``control`` once; returns what was done."""
    if kind == "slider":
        handle = control.locator(".noUi-handle").first
        now, top = (float(handle.get_attribute(a)) for a in ("aria-valuenow", "aria-valuemax"))
        key = "ArrowRight" if now < top else "ArrowLeft"
        handle.focus()
        page.keyboard.press(key)
        return f"pressed {key} on the slider at {now:g}"
    if kind == "dropdown":
        select = control.locator("select")
        index = (select.evaluate("s => s.selectedIndex") + 1) % select.locator("option").count()
        select.select_option(index=index)
        return f"picked option {index}"
    if kind == "toggle-buttons":
        button = control.locator("button:not(.mod-active)").first
        label = button.inner_text()
        button.click()
        return f"clicked {label!r}"
    if kind in ("button", "checkbox", "play"):
        (control.locator("input, button").first if kind != "button" else control).click()
        return "clicked it"
    if kind == "text":
        box = control.locator("input, textarea").first
        if box.get_attribute("type") == "number":
            value, top = float(box.input_value()), float(box.get_attribute("max") or "inf")
            box.fill(f"{value + 1 if value < top else value - 1:g}")
        else:
            box.fill(box.input_value() + "x")
        box.press("Enter")
        return f"typed {box.input_value()!r} into it"
    raise AssertionError(f"no way to operate a control of kind {kind}")


def widget_docs() -> list[str]:
    return [doc for doc in BOOK_NOTEBOOKS if "hybridpar.viz" in source_of(doc).read_text()]


@pytest.mark.parametrize("doc", widget_docs())
def test_every_control_changes_the_page(browser: object, server: str, doc: str) -> None:
    """Each control of each widget in the built page, operated once in turn, changes what its widget
    shows, with no kernel behind the page: nothing the book shows is inert."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    if WIDGET_VIEW_MIME not in (HTML / f"{doc}.html").read_text():
        pytest.skip(f"{doc} shows no widget")
    page, report = open_page(browser, f"{server}/{doc}.html")
    views = wait_for_widgets(page)
    roots = page.locator(".widget-subarea > .jupyter-widgets")
    assert roots.count() == views, f"{views - roots.count()} of {views} widgets did not render"
    done, inert = [], []
    for w in range(views):
        root = roots.nth(w)
        controls = root.evaluate("(root, args) => (" + FIND_CONTROLS_JS + ")([root, ...args])",
                                 [CONTROL_KINDS, list(PASSIVE_KINDS)])
        unknown = [c["label"] for c in controls if c["kind"] == "unknown"]
        assert not unknown, f"widget {w} has views this test cannot classify: {unknown}; add them to CONTROL_KINDS"
        for i, c in enumerate(controls):
            control = root.locator(f'[data-hp-control="{i}"]')
            control.scroll_into_view_if_needed()
            before = root.evaluate(SHOWN_JS)
            action = operate(page, control, c["kind"])
            try:
                page.wait_for_function(f"([root, before]) => ({SHOWN_JS})(root) !== before",
                                       arg=[root.element_handle(), before], timeout=20_000)
                done.append(f"widget {w}, {c['kind']} {c['label']!r}: {action}")
            except PlaywrightTimeoutError:
                inert.append(f"widget {w}, {c['kind']} {c['label']!r}: {action}, nothing changed")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"controls-{doc.replace('/', '-')}.png"))
    page.context.close()
    print(f"{doc}:", *done, sep="\n  ")  # shown with -s: what was operated
    assert report.errors == [], report.errors
    assert not inert, "controls that do nothing in the static book:\n" + "\n".join(inert)
    assert done, f"{doc} shows {views} widget(s) but no control to operate"


def test_precomputed_explorer_works_without_a_kernel(browser: object, server: str) -> None:
    page, _ = open_page(browser, f"{server}/chapters/01_why_distribute.html")
    assert wait_for_widgets(page) == page.locator(".widget-subarea > .jupyter-widgets").count()
    explorer = page.locator(".widget-subarea > .jupyter-widgets").filter(has=page.locator("table.hybridpar-roofline"))
    assert explorer.count() == 1, "chapter 1 shows the explorer, and not the kernel-only calculator"
    visible_caption = explorer.locator("table.hybridpar-roofline caption:visible")
    before = visible_caption.inner_text()
    explorer.locator(".widget-slider .noUi-handle").first.focus()  # the TP-size slider
    page.keyboard.press("ArrowRight")
    page.wait_for_function(
        "([el, text]) => [...el.querySelectorAll('caption')].some(c => c.offsetParent && c.innerText !== text)",
        arg=[explorer.element_handle(), before],
    )
    after = visible_caption.inner_text()
    explorer.scroll_into_view_if_needed()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chapter-explorer.png"))  # the widget after the slider moved
    page.context.close()
    assert "1 x h100" in before and "2 x h100" in after, (before, after)


def test_navigation_search_and_reader_features(browser: object, server: str) -> None:
    page, _ = open_page(browser, f"{server}/chapters/01_why_distribute.html")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "chapter.png"))
    nav = page.locator("nav.bd-docs-nav a.reference.internal")
    targets = {nav.nth(i).get_attribute("href") for i in range(nav.count())}
    assert {"../intro.html", "../labs/01_roofline.html", "../glossary.html", "../bibliography.html"} <= targets
    assert page.locator(".prev-next-area a").count() >= 1
    assert page.locator(".search-button-field, form.bd-search").count() >= 1
    # Repository and download buttons; no Colab button on a .md chapter (Colab opens .ipynb only).
    assert page.locator('a[href="https://github.com/hybridpar/hybridpar"]').count() >= 1
    downloads = page.locator('.dropdown-download-buttons a[href*="_sources/"]')
    assert downloads.count() >= 1
    # Glossary links and citations.
    assert page.locator('a[href^="../glossary.html#term-"]').count() >= 5
    assert page.locator('a[href^="../bibliography.html#id"]').count() >= 3
    # Exercises with hidden solutions.
    assert page.locator(".exercise").count() >= 2
    solution = page.locator(".solution").first
    body = solution.locator("section").first
    assert not body.is_visible(), "solutions must start hidden"
    solution.locator(".admonition-title").click()
    body.wait_for(state="visible")
    # Dark mode.
    page.locator(".theme-switch-button").first.click()
    themes = {page.evaluate("document.documentElement.dataset.theme")}
    page.locator(".theme-switch-button").first.click()
    themes.add(page.evaluate("document.documentElement.dataset.theme"))
    assert "dark" in themes
    page.context.close()

    page, _ = open_page(browser, f"{server}/search.html?q=roofline")
    page.wait_for_selector("#search-results li", timeout=20_000)
    hits = page.locator("#search-results li a").all_inner_texts()
    page.context.close()
    assert any("Why distribute" in hit for hit in hits), hits


CONTRAST_JS = """el => {
  const rgb = c => c.match(/[\\d.]+/g).slice(0, 3).map(Number);
  const lum = c => { const [r, g, b] = rgb(c).map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
                     return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
  let bg = el;
  while (bg && getComputedStyle(bg).backgroundColor.replace(/\\s/g, '').match(/rgba\\(.*,0\\)$/)) bg = bg.parentElement;
  const [a, b] = [lum(getComputedStyle(el).color), lum(getComputedStyle(bg || document.body).backgroundColor)];
  return (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
}"""


@pytest.mark.parametrize("mode", ["light", "dark"])
def test_widget_text_is_readable_and_screenshots(browser: object, server: str, mode: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page, _ = open_page(browser, f"{server}/labs/01_roofline.html", theme=mode)
    assert page.evaluate("document.documentElement.dataset.theme") == mode
    wait_for_widgets(page)
    cell = page.locator(".widget-subarea table.hybridpar-roofline td").first
    contrast = cell.evaluate(CONTRAST_JS)
    page.locator(".widget-subarea").first.scroll_into_view_if_needed()
    page.screenshot(path=str(SCREENSHOTS / f"lab-{mode}.png"))
    page.context.close()
    assert contrast >= 4.5, f"widget table text has contrast {contrast:.1f}:1 in {mode} mode"
    assert (SCREENSHOTS / f"lab-{mode}.png").stat().st_size > 10_000
