"""The report every `haina eval <kind>` writes, and how its output directory is made.

`DIR/report.json` holds the run's scalar metrics at the top level (`ppl`, `loss`, `bleu`, ...), so that
`report["ppl"]` works and `haina eval compare` can line several reports up, next to what produced them:
the kind, the exact command, the checkpoint (and adapter), a sha256 of the data, haina's version and the
date. Anything structured (per-example rows, noise tables, per-group metrics) goes under `details`.
`DIR/report.md` says the same for people, with the tables each kind adds.

A report is written only when its evaluation finished: `eval_output` builds the directory beside `--out`
and swaps it in at the end, so an interrupted or failed run never leaves numbers that look complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shlex
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from haina.core.io import write_json, write_text
from haina.core.output import output_dir

REPORT = "report.json"
REPORT_MD = "report.md"

# Set by `haina.cli.main` to the words it was called with: the report records the exact command.
_invocation: list[str] | None = None


def set_invocation(argv: Sequence[str]) -> None:
    """Remember the command line (called by the CLI before it runs a command)."""
    global _invocation
    _invocation = list(argv)


def command_line() -> str:
    """The command as the user typed it (`haina eval lm ...`), or the Python process's argv when called as a library."""
    words = ["haina", *_invocation] if _invocation is not None else [Path(sys.argv[0]).name, *sys.argv[1:]]
    return shlex.join(words)


def data_sha256(paths: Iterable[str | os.PathLike | None]) -> str | None:
    """One sha256 over every data file given (directories: every file under them, sorted), names included.

    The names are relative to each given path, so the same data copied elsewhere hashes the same.
    """
    h = hashlib.sha256()
    seen = False
    for raw in paths:
        if raw is None:
            continue
        root = Path(raw)
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for f in files:
            if f.name == "haina-manifest.json":  # written at a different time for the same data
                continue
            seen = True
            h.update(str(f.relative_to(root) if root.is_dir() else f.name).encode() + b"\0")
            with open(f, "rb") as fh:
                h.update(hashlib.file_digest(fh, "sha256").digest())
    return h.hexdigest() if seen else None


@dataclass
class Report:
    """What one evaluation found. `metrics` are scalars (compared across runs); `details` anything else.

    `sections` are (title, markdown) pairs that `report.md` shows after the metrics table; `images` are the
    PNG file names the run wrote into its directory (linked from `report.md`).
    """

    kind: str
    metrics: dict[str, float | int | None]
    details: dict[str, Any] = field(default_factory=dict)
    sections: list[tuple[str, str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    adapter: str | None = None
    data: list[str] = field(default_factory=list)


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: write null for them (a metric that could not be computed)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def report_json(report: Report) -> dict[str, Any]:
    """The report.json object: metrics at the top level, then what produced them, then the details."""
    from haina import __version__

    reserved = {"kind", "command", "checkpoint", "adapter", "data", "data_sha256", "haina_version", "created",
                "details"}
    clash = reserved & set(report.metrics)
    if clash:
        raise ValueError(f"metric names {sorted(clash)} are reserved report fields")
    return _clean({
        "kind": report.kind,
        **report.metrics,
        "command": command_line(),
        "checkpoint": report.checkpoint,
        "adapter": report.adapter,
        "data": [str(p) for p in report.data],
        "data_sha256": data_sha256(report.data),
        "haina_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "details": report.details,
    })


def fmt(value: Any) -> str:
    """A metric as a table shows it: integers with separators, floats to 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells go through `fmt`, the first column is left-aligned, the rest right."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in row) + " |")
    return "\n".join(lines)


def report_markdown(obj: dict[str, Any], report: Report) -> str:
    """report.md: a title, what was evaluated, the metrics, then each kind's own sections and pictures."""
    lines = [f"# haina eval {report.kind}", "",
             f"- checkpoint: `{obj['checkpoint']}`" + (f" + adapter `{obj['adapter']}`" if obj["adapter"] else ""),
             f"- data: {', '.join(f'`{d}`' for d in obj['data']) or '–'}"
             + (f" (sha256 {obj['data_sha256'][:12]}…)" if obj["data_sha256"] else ""),
             f"- command: `{obj['command']}`",
             f"- haina {obj['haina_version']}, {obj['created']}", "",
             markdown_table(["metric", "value"], [(k, v) for k, v in report.metrics.items()]), ""]
    for title, body in report.sections:
        lines += [f"## {title}", "", body.rstrip(), ""]
    for image in report.images:
        lines += [f"![{Path(image).stem}]({image})", ""]
    return "\n".join(lines)


def write_report(directory: str | os.PathLike, report: Report) -> dict[str, Any]:
    """Write report.json and report.md into `directory` (the one `eval_output` yielded); return the JSON object."""
    directory = Path(directory)
    obj = report_json(report)
    write_json(directory / REPORT, obj)
    write_text(directory / REPORT_MD, report_markdown(obj, report))
    return obj


@contextlib.contextmanager
def eval_output(out: str | os.PathLike, kind: str, *, inputs: Iterable[str | os.PathLike | None] = (),
                overwrite: bool = False) -> Iterator[Path]:
    """The directory an `eval KIND` run writes into; swapped in for `out` only when the block finishes.

    `out` may hold an earlier report of the same kind (replaced), must not be anything else unless
    `overwrite`, and never is or contains an input (the checkpoint or the data).
    """
    with output_dir(out, f"eval {kind}", inputs=[p for p in inputs if p is not None], overwrite=overwrite) as tmp:
        yield tmp


def print_summary(obj: dict[str, Any], metrics: Iterable[str], out: str | os.PathLike) -> None:
    """One line with the headline metrics, then where the report is."""
    parts = [f"{k} {fmt(obj.get(k))}" for k in metrics if k in obj]
    print(", ".join(parts))
    print(f"report: {Path(out) / REPORT}")
