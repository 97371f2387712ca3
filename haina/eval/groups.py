"""Fairness slices (`--group-field F`): every metric per group, and the largest gap between groups."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from haina.core.errors import HainaError


def group_values(records: Sequence[dict[str, Any]], field: str, where: str) -> list[str]:
    """Each record's group as a string; a record without the field is a one-line error naming it."""
    out = []
    for i, r in enumerate(records):
        if field not in r or r[field] is None:
            raise HainaError(f"{where}: record {i + 1} has no '{field}' (--group-field); give every record a group")
        out.append(str(r[field]))
    return out


def per_group(groups: Sequence[str], score: Callable[[list[int]], dict[str, float]]) -> dict[str, dict[str, float]]:
    """{group: metrics}, where `score(indices)` computes the metrics of the examples at `indices`."""
    index: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        index.setdefault(g, []).append(i)
    return {g: {"n": len(ix), **score(ix)} for g, ix in sorted(index.items())}


def largest_gaps(by_group: dict[str, dict[str, float]]) -> dict[str, dict[str, Any]]:
    """For each metric: the largest difference between two groups, and which groups hold the extremes."""
    metrics = dict.fromkeys(k for m in by_group.values() for k in m if k != "n")
    out = {}
    for k in metrics:
        vals = {g: m[k] for g, m in by_group.items() if isinstance(m.get(k), (int, float)) and m[k] == m[k]}
        if len(vals) < 2:
            continue
        lo, hi = min(vals, key=vals.get), max(vals, key=vals.get)
        out[k] = {"gap": vals[hi] - vals[lo], "max_group": hi, "min_group": lo}
    return out


def groups_markdown(by_group: dict[str, dict[str, float]], gaps: dict[str, dict[str, Any]]) -> str:
    """A table of metrics per group, then the gap row."""
    from haina.eval.report import markdown_table

    metrics = list(dict.fromkeys(k for m in by_group.values() for k in m))
    rows = [[g, *[m.get(k) for k in metrics]] for g, m in by_group.items()]
    rows.append(["largest gap", *[gaps[k]["gap"] if k in gaps else None for k in metrics]])
    return markdown_table(["group", *metrics], rows)
