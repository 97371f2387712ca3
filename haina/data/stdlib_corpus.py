"""An embedded corpus: the documentation that ships inside every Python installation.

Two sources, nothing downloaded: the pydoc topics (`pydoc_data.topics`, the language reference
sections behind `help("if")`), one document each, and the docstrings of the standard library,
one document per module, read from the `.py` sources with `ast` and never imported (importing
would run module code, open windows with tkinter, and take minutes). Each docstring gets a
header with its qualified name and signature, so the text reads like `pydoc` output.

On CPython 3.11 this yields about 560 documents and 2.1 million characters (0.46 M of them from
the 79 topics; private names are left out, as the documentation leaves them out, and adding them
would give only 10% more), built in about 3 seconds: enough for the quickstart's small model.
"""

from __future__ import annotations

import ast
import inspect
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from haina.core.io import atomic_path

# Tests, the IDE, 2to3's grammar fixtures and the GUI demos: not documentation, or not prose.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "tkinter", "turtledemo",
             "__pycache__"}


def _skip_dir(name: str) -> bool:
    return name in SKIP_DIRS or name.startswith((".", "config-"))  # config-3.11-*: the build's own scripts


def stdlib_files(root: Path) -> list[tuple[str, Path]]:
    """(module name, path) of every standard-library source file, sorted by module name."""
    out = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not _skip_dir(d))
        rel = Path(dirpath).relative_to(root)
        for f in files:
            if not f.endswith(".py"):
                continue
            parts = [*rel.parts, f[:-3]]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and all(p.isidentifier() for p in parts):
                out.append((".".join(parts), Path(dirpath, f)))
    return sorted(out)


def _public(name: str) -> bool:
    return not name.startswith("_") or (name.startswith("__") and name.endswith("__"))


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return ast.unparse(node.args)
    except Exception:  # noqa: BLE001 (a signature is decoration; a node ast cannot unparse loses only it)
        return "..."


def _entries(body: list[ast.stmt], prefix: str) -> Iterator[tuple[str, str]]:
    """(header, docstring) for the documented classes and functions in `body`, in source order."""
    for node in body:
        if isinstance(node, ast.ClassDef) and _public(node.name):
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield f"class {prefix}{node.name}" + (f"({bases})" if bases else ""), doc
            yield from _entries(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _public(node.name):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                kw = "async def " if isinstance(node, ast.AsyncFunctionDef) else ""
                yield f"{kw}{prefix}{node.name}({_signature(node)})", doc


def _module_document(module: str, path: Path, seen: set[str]) -> str | None:
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))  # bytes: ast honours coding cookies
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return None
    parts = []
    doc = ast.get_docstring(tree, clean=True)
    if doc and doc not in seen:
        seen.add(doc)
        parts.append(f"module {module}\n\n{doc}")
    for header, doc in _entries(tree.body, f"{module}."):
        if doc in seen:  # an overriding method that repeats its parent's docstring, a copied helper
            continue
        seen.add(doc)
        parts.append(header + "\n\n" + "\n".join("    " + line if line else "" for line in doc.splitlines()))
    if not parts:
        return None
    if not parts[0].startswith("module "):
        parts.insert(0, f"module {module}")
    return "\n\n".join(parts) + "\n"


def iter_stdlib_documents() -> Iterator[dict]:
    """Documents `{"id", "text", "source"}`: pydoc topics first, then one per stdlib module, in sorted order."""
    from pydoc_data.topics import topics  # data only: a dict of strings

    for key in sorted(topics):
        text = inspect.cleandoc(topics[key])
        if text:
            yield {"id": f"pydoc:{key}", "text": text + "\n", "source": "pydoc_data.topics"}
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for module, path in stdlib_files(root):
        text = _module_document(module, path, seen)
        if text:
            yield {"id": f"stdlib:{module}", "text": text, "source": str(path.relative_to(root))}


def build_stdlib_corpus() -> list[str]:
    """The texts of the embedded corpus (see `iter_stdlib_documents`), deterministic for a given Python."""
    return [d["text"] for d in iter_stdlib_documents()]


def write_stdlib_corpus(path: str | Path) -> dict:
    """Write the embedded corpus as JSONL (`{"id", "text", "source"}` per line), atomically.

    Returns:
        {"documents": int, "characters": int, "path": str}.
    """
    documents = characters = 0
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for doc in iter_stdlib_documents():
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            documents += 1
            characters += len(doc["text"])
    return {"documents": documents, "characters": characters, "path": str(path)}
