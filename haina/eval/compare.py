"""`haina eval compare DIR…`: several reports side by side, one markdown table (rows: metrics; columns: runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from haina.core.errors import HainaError
from haina.core.io import read_json, write_text
from haina.eval.report import REPORT, markdown_table

COMPARE = "compare.md"
# Fields of report.json that describe the run rather than measure it.
_META = {"kind", "command", "checkpoint", "adapter", "data", "data_sha256", "haina_version", "created", "details"}


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """The report.json of an eval directory (or the file itself), validated enough to compare."""
    p = Path(path)
    f = p / REPORT if p.is_dir() else p
    if not f.is_file():
        raise HainaError(f"{path} has no {REPORT}; give directories written by `haina eval <kind> --out DIR`")
    obj = read_json(f, "it should be written by `haina eval`", expect=dict)
    if "kind" not in obj:
        raise HainaError(f"{f} is not a haina eval report (no 'kind'); give directories written by `haina eval`")
    return obj


def scalar_metrics(obj: dict[str, Any]) -> dict[str, float | int | None]:
    """The report's top-level numbers (the metrics), in their order."""
    return {k: v for k, v in obj.items() if k not in _META and (v is None or isinstance(v, (int, float)))
            and not isinstance(v, bool)}


def _labels(paths: list[Path]) -> list[str]:
    """Column names: each directory's name, with its parent's where two names would clash."""
    names = [p.name or str(p) for p in paths]
    if len(set(names)) == len(names):
        return names
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def compare_table(paths: list[str | os.PathLike]) -> str:
    """The markdown table comparing the reports in `paths` (metrics in first-seen order)."""
    dirs = [Path(p) for p in paths]
    reports = [read_report(p) for p in dirs]
    metrics = [scalar_metrics(r) for r in reports]
    rows: list[str] = []
    for m in metrics:
        rows += [k for k in m if k not in rows]
    kinds = sorted({r["kind"] for r in reports})
    head = ["metric", *_labels([d.parent if d.is_file() else d for d in dirs])]
    body = [[k, *[m.get(k) for m in metrics]] for k in rows]
    body.append(["kind", *[r["kind"] for r in reports]])
    body.append(["checkpoint", *[f"`{r.get('checkpoint')}`" + (" + adapter" if r.get("adapter") else "")
                                 for r in reports]])
    data = [(r.get("data_sha256") or "–")[:12] for r in reports]
    body.append(["data sha256", *data])
    note = ""
    if len(kinds) > 1:
        note += f"\nNote: the reports are of different kinds ({', '.join(kinds)}).\n"
    if len({d for d in data if d != "–"}) > 1:
        note += "\nNote: the runs evaluated different data; their numbers are not directly comparable.\n"
    return markdown_table(head, body) + "\n" + note


def _is_compare_table(path: Path) -> bool:
    """Whether `path` is an earlier `eval compare` table (the only file this command replaces)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.readline().startswith("| metric |")
    except (OSError, UnicodeDecodeError):
        return False


def compare_command(reports: list[str], /, out: str | None = None) -> None:
    """Compare evaluation reports side by side: one markdown table, rows are metrics and columns are runs.

    The table is printed and written to OUT (default: compare.md in the directory that holds the first
    report's directory, i.e. beside the reports).

    Args:
        reports: directories written by `haina eval <kind> --out DIR` (or their report.json files).
        out: the markdown file to write (default: compare.md beside the reports).
    """
    if len(reports) < 1:
        raise HainaError("give at least one report directory to compare")
    table = compare_table(list(reports))
    first = Path(reports[0])
    target = Path(out) if out else (first.parent.parent if first.is_file() else first.parent) / COMPARE
    if target.is_dir():
        raise HainaError(f"--out {target} is a directory; give a file name such as compare.md")
    if target.exists() and not _is_compare_table(target):
        raise HainaError(f"--out {target} exists and is not a table written by `haina eval compare`; choose another "
                         "--out")
    write_text(target, table)
    print(table)
    print(f"written: {target}")
