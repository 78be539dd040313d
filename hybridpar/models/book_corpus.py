"""The training text of the built-in model: the course's own prose, cleaned of markup, and its glossary as chats.

:func:`book_corpus` reads the files a :class:`~hybridpar.models.train_tiny.TinyRecipe` names
(``intro.md``, ``glossary.md``, the chapters and the labs' markdown cells), keeps the paragraphs of
English (:func:`clean_markdown` drops code, math, figures, tables and MyST roles but keeps the words
of glossary terms and links), and turns each glossary entry into a ChatML exchange
(:func:`chat_text`), so the model answers "What is ...?" with the glossary's definition.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hybridpar.models.train_tiny import TinyRecipe

REPO_ROOT = Path(__file__).resolve().parents[2]
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS, IM_START, IM_END = SPECIAL_TOKENS

_DROP_BLOCKS = ("code-cell", "literalinclude", "code", "math", "raw", "figure", "image", "mermaid")
_FENCE = re.compile(r"^(`{3,}|:{3,})\s*(\{([\w-]+)\})?\s*(.*)$")
_ROLE_WITH_TEXT = re.compile(r"\{(term|doc|ref|numref)\}`([^`<]*?)\s*<[^`>]*>`")
_ROLE = re.compile(r"\{(term)\}`([^`]*)`")
_DROP_ROLE = re.compile(r"\s?\{(cite|doc|ref|numref|eq|download)\}`[^`]*`")
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_LIST_ITEM = re.compile(r"^\s*([-*+]|\d+\.)\s+")


def clean_markdown(text: str) -> list[str]:
    """The paragraphs of English in a MyST markdown text (see the module docstring for what is dropped)."""
    lines = text.splitlines()
    if lines and lines[0].strip() == "---":  # front matter
        end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), 0)
        lines = lines[end + 1:]
    paragraphs: list[str] = []
    current: list[str] = []
    fences: list[tuple[str, bool]] = []  # (marker, dropping) of the open fenced blocks
    in_math = False

    def flush() -> None:
        if current:
            text = " ".join(current)
            text = _ROLE_WITH_TEXT.sub(r"\2", text)
            text = _ROLE.sub(r"\2", text)
            text = _DROP_ROLE.sub("", text)
            text = _LINK.sub(r"\1", text)
            text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
            text = re.sub(r"\s+", " ", text).strip()
            if len(text) > 1:
                paragraphs.append(text)
            current.clear()

    for raw in lines:
        line = raw.rstrip()
        stripped = line.strip()
        fence = _FENCE.match(stripped)
        if fences and stripped == fences[-1][0]:  # closing fence
            fences.pop()
            flush()
            continue
        dropping = any(drop for _, drop in fences)
        if fence and (fence.group(2) or not fence.group(1).startswith(":") or fence.group(4) == ""):
            marker, directive, title = fence.group(1), fence.group(3), fence.group(4)
            flush()
            drop = dropping or directive in _DROP_BLOCKS or (directive is None and marker.startswith("`"))
            fences.append((marker, drop))
            if not drop and directive in ("admonition", "note", "tip", "important", "warning") and title:
                current.append(title + ".")
                flush()
            continue
        if dropping:
            continue
        if stripped.startswith("$$"):  # display math: "$$ ... $$" on one line, or a block between "$$" lines
            if stripped == "$$" or not stripped.endswith("$$"):
                in_math = not in_math
            flush()
            continue
        if in_math:
            continue
        if not stripped:
            flush()
            continue
        if stripped.startswith(("|", "<", ":", "![")) or (stripped.startswith("(") and stripped.endswith(")=")):
            flush()  # tables, html, directive options, images, (label)= targets
            continue
        if stripped.startswith("#"):
            flush()
            current.append(stripped.lstrip("#").strip())
            flush()
            continue
        if _LIST_ITEM.match(stripped):
            flush()
        current.append(stripped)
    flush()
    return paragraphs


def notebook_markdown(path: Path) -> str:
    """The markdown cells of a notebook, one after the other."""
    nb = json.loads(path.read_text())
    return "\n\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def glossary_entries(text: str) -> list[tuple[str, str]]:
    """``(term, definition)`` pairs of the ``{glossary}`` block of ``glossary.md``."""
    m = re.search(r"```\{glossary\}\n(.*?)\n```", text, re.S)
    if not m:
        return []
    entries: list[tuple[str, list[str]]] = []
    for line in m.group(1).splitlines():
        if line and not line[0].isspace():
            entries.append((line.strip(), []))
        elif line.strip() and entries:
            entries[-1][1].append(line.strip())
    return [(term, clean_markdown(" ".join(body))[0]) for term, body in entries if body]


def chat_text(question: str, answer: str) -> str:
    """One user/assistant exchange in the chat template's format."""
    return f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n{answer}{IM_END}\n"


def book_corpus(recipe: TinyRecipe, root: Path = REPO_ROOT) -> tuple[list[str], list[str]]:
    """``(documents, chats)``: the cleaned text of each corpus file, and the glossary as chats."""
    files = sorted({p for pattern in recipe.corpus for p in root.glob(pattern)})
    if not files:
        raise FileNotFoundError(f"no corpus file matches {recipe.corpus} under {root}: run from a repository checkout")
    docs, chats = [], []
    for path in files:
        text = notebook_markdown(path) if path.suffix == ".ipynb" else path.read_text()
        docs.append("\n\n".join(clean_markdown(text)))
        if path.name == "glossary.md":
            for term, definition in glossary_entries(text):
                article = "" if term[:1].isupper() or term.endswith("s") else "an " if term[:1] in "aeiou" else "a "
                chats.append(chat_text(f"What is {article}{term}?", definition))
    return docs, chats
