"""The two lm-eval tasks bundled in `recipes/eval/`, built offline from the standard library's docstrings.

- `stdlib_mc` (multiple choice): "Which module defines the function heappush()? Its documentation says: Push
  item onto heap, maintaining the heap invariant." with four module names to choose from.
- `stdlib_docstring` (generation): "Function: heapq.heappush(heap, item)\\nSummary:" → the first line of its
  docstring, scored by exact match (surrounding whitespace ignored) and chrF.

The sources are read with `ast` (never imported), as `haina data instruct` reads them; every choice (which
functions, the distractors, the gold position) comes from a seeded hash, so the same Python writes the same
files. The JSONL files ship in the repository; run `python -m haina.eval.stdlib_tasks recipes/eval` to
rebuild them after a Python upgrade.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
from pathlib import Path

from haina.core.io import atomic_path
from haina.data.instruct import stdlib_root, summarize

# Familiar pure-Python modules with several documented public functions each.
MODULES = ("base64", "bisect", "calendar", "copy", "dataclasses", "difflib", "dis", "doctest", "email.utils",
           "fnmatch", "functools", "glob", "heapq", "inspect", "ipaddress", "linecache", "logging", "mimetypes",
           "operator", "os", "pprint", "secrets", "shlex", "shutil", "stat", "statistics", "subprocess",
           "tempfile", "textwrap", "threading", "tokenize", "traceback", "urllib.parse", "uuid", "warnings")
MC_ITEMS = 80
GEN_ITEMS = 60
PER_MODULE = 4  # at most this many questions about one module, so that no module dominates
MAX_SIGNATURE = 40  # characters: the generation prompt shows the signature, kept short for small contexts
MAX_SUMMARY = 120
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)(\s*->.*)?$")


def _unit(*parts: object) -> float:
    """A number in [0, 1) from `parts`, the same in every process (Python's `hash` is salted per run)."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _module_path(module: str) -> Path:
    root = stdlib_root() / module.replace(".", "/")
    return root.with_suffix(".py") if root.with_suffix(".py").is_file() else root / "__init__.py"


def functions() -> list[dict]:
    """Every documented public module-level function of `MODULES`: module, name, signature, summary, first line."""
    out = []
    for module in MODULES:
        tree = ast.parse(_module_path(module).read_bytes())
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node, clean=True) or ""
            summary, _ = summarize(doc, MAX_SUMMARY)
            first = doc.splitlines()[0].strip() if doc else ""
            out.append({"module": module, "name": node.name, "signature": ast.unparse(node.args),
                        "summary": summary, "first_line": first})
    return out


def _pick(candidates: list[dict], n: int, seed: int, tag: str) -> list[dict]:
    """`n` candidates, at most PER_MODULE per module, by seeded hash; in module then name order."""
    ranked = sorted(candidates, key=lambda c: _unit(tag, seed, c["module"], c["name"]))
    taken: dict[str, int] = {}
    out = []
    for c in ranked:
        if len(out) == n:
            break
        if taken.get(c["module"], 0) < PER_MODULE:
            taken[c["module"]] = taken.get(c["module"], 0) + 1
            out.append(c)
    return sorted(out, key=lambda c: (c["module"], c["name"]))


def multiple_choice_items(funcs: list[dict], n: int = MC_ITEMS, seed: int = 0) -> list[dict]:
    """`{"query", "choices", "label", "name"}` records: which module defines a function, four choices."""
    owners: dict[str, set[str]] = {}
    for f in funcs:
        owners.setdefault(f["name"], set()).add(f["module"])
    # A name defined in two modules (open, split) would make two choices right; a summary naming its module
    # gives the answer away.
    usable = [f for f in funcs if f["summary"] and len(owners[f["name"]]) == 1
              and not re.search(rf"\b{re.escape(f['module'])}\b", f["summary"])]
    items = []
    for f in _pick(usable, n, seed, "mc"):
        others = sorted((m for m in MODULES if m != f["module"]), key=lambda m: _unit("distractor", seed, f["name"], m))
        choices = others[:3]
        label = int(_unit("gold", seed, f["name"]) * 4)
        choices.insert(label, f["module"])
        query = (f"Question: Which Python module defines the function {f['name']}()? Its documentation says: "
                 f"{f['summary']}\nAnswer:")
        items.append({"query": query, "choices": choices, "label": label, "name": f"{f['module']}.{f['name']}"})
    return items


def generation_items(funcs: list[dict], n: int = GEN_ITEMS, seed: int = 0) -> list[dict]:
    """`{"prompt", "target", "name"}` records: a function's signature → the first line of its docstring."""
    usable = [f for f in funcs if len(f["signature"]) <= MAX_SIGNATURE and 20 <= len(f["first_line"]) <= 90
              and f["first_line"].endswith(".") and not _SIGNATURE_LINE.match(f["first_line"])]
    return [{"prompt": f"Function: {f['module']}.{f['name']}({f['signature']})\nSummary:", "target": f["first_line"],
             "name": f"{f['module']}.{f['name']}"} for f in _pick(usable, n, seed, "gen")]


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_tasks(directory: str | Path, seed: int = 0) -> dict[str, int]:
    """(Re)write `stdlib_mc.jsonl` and `stdlib_docstring.jsonl` in `directory`; return their item counts."""
    directory = Path(directory)
    funcs = functions()
    mc, gen = multiple_choice_items(funcs, seed=seed), generation_items(funcs, seed=seed)
    _write_jsonl(directory / "stdlib_mc.jsonl", mc)
    _write_jsonl(directory / "stdlib_docstring.jsonl", gen)
    return {"stdlib_mc": len(mc), "stdlib_docstring": len(gen)}


if __name__ == "__main__":
    print(write_tasks(sys.argv[1] if len(sys.argv) > 1 else "recipes/eval"))
