"""Report / EDA: counts per stage and reason, the accounting equation, lengths, classes, clusters, sources.

Writes `OUT/report.json`, `OUT/report.md`, `OUT/lengths.png` and, with labels, `OUT/classes.png`.
The accounting invariant — documents in = kept + Σ dropped per reason — is checked here, and a
pipeline that breaks it fails instead of writing a report that quietly does not add up.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from pathlib import Path

from haina.core.config import to_dict
from haina.core.io import atomic_path, write_json, write_text
from haina.core.log import info
from haina.data.prepare.pii import KINDS, PLACEHOLDERS

# Length bins: 0, then 10 log-spaced bins per decade up to 10 million words.
_EDGES = sorted({0, *(round(10 ** (k / 10)) for k in range(71))})


class LengthHistogram:
    """A fixed-bin histogram of document lengths: bounded memory whatever the corpus size."""

    def __init__(self, counts: list[int] | None = None, total: int = 0, lo: int | None = None, hi: int = 0):
        self.counts = counts or [0] * len(_EDGES)
        self.total, self.lo, self.hi = total, lo, hi

    def add(self, n: int) -> None:
        self.counts[bisect.bisect_right(_EDGES, n) - 1] += 1
        self.total += n
        self.lo = n if self.lo is None else min(self.lo, n)
        self.hi = max(self.hi, n)

    def merge(self, other: LengthHistogram) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts)]
        self.total += other.total
        if other.lo is not None:
            self.lo = other.lo if self.lo is None else min(self.lo, other.lo)
        self.hi = max(self.hi, other.hi)

    @property
    def n(self) -> int:
        return sum(self.counts)

    def to_dict(self) -> dict:
        return {"counts": self.counts, "total": self.total, "lo": self.lo, "hi": self.hi}

    @classmethod
    def from_dict(cls, d: dict) -> LengthHistogram:
        return cls(list(d["counts"]), d["total"], d["lo"], d["hi"])

    def quantile(self, q: float) -> int:
        """The upper edge of the bin holding quantile `q` (exact to within one bin, ~26 %)."""
        target, seen = q * self.n, 0
        for i, c in enumerate(self.counts):
            seen += c
            if c and seen >= target:
                return min(_EDGES[i + 1] - 1 if i + 1 < len(_EDGES) else self.hi, self.hi)
        return self.hi

    def summary(self) -> dict:
        if not self.n:
            return {"documents": 0}
        return {"documents": self.n, "words": self.total, "mean": round(self.total / self.n, 1), "min": self.lo,
                "p50": self.quantile(0.5), "p90": self.quantile(0.9), "p99": self.quantile(0.99), "max": self.hi}


def label_name(key: str) -> str:
    """A stratification key (JSON of the label) back to a readable label."""
    value = json.loads(key) if key else None
    return value if isinstance(value, str) else json.dumps(value)


def check_accounting(n_in: int, kept: int, dropped: dict[str, int], rejects_written: int) -> str:
    """The equation as text; raises RuntimeError if it does not hold."""
    total = sum(dropped.values())
    terms = " + ".join(f"{v:,} {k}" for k, v in sorted(dropped.items(), key=lambda kv: -kv[1]))
    equation = f"{n_in:,} in = {kept:,} kept + {total:,} dropped" + (f" ({terms})" if terms else "")
    if n_in != kept + total or rejects_written != total:
        raise RuntimeError(f"accounting invariant violated: {equation}; {rejects_written:,} rejects written. "
                           "This is a bug in haina data prepare: please report it.")
    return equation


def write_report(out: Path, cfg, units, skipped, unit_stats: list[dict], dedup_info: dict, written: dict,
                 timings: dict) -> dict:
    """Assemble, check, and write the report; returns it as a dict."""
    n_in = sum(s["documents_in"] for s in unit_stats)
    dropped: Counter = Counter()
    for s in unit_stats:
        dropped.update(s["dropped"])
    dropped.update(written["dedup_dropped"])
    kept = sum(v["documents"] for v in written["splits"].values())
    equation = check_accounting(n_in, kept, dict(dropped), written["rejects_written"])
    info(f"accounting: {equation}")

    before = LengthHistogram()
    for s in unit_stats:
        before.merge(LengthHistogram.from_dict(s["length_before"]))
    after: LengthHistogram = written["length_after"]
    c4_lines: Counter = Counter()
    pii: Counter = Counter()
    pii_rejects: Counter = Counter()
    for s in unit_stats:
        c4_lines.update({k: v for k, v in s.items() if k.startswith("c4_lines_")})
        pii.update(s.get("pii", {}))
        pii_rejects.update(s.get("pii_rejects", {}))
    filter_reasons = {k: v for k, v in dropped.items() if k.startswith(("gopher_", "repetition_", "c4_"))}

    labels: dict[str, Counter] = written["labels"]
    balance: Counter = Counter()
    for c in labels.values():
        balance.update(c)
    warnings = []
    imbalance = None
    if balance:
        imbalance = round(max(balance.values()) / min(balance.values()), 2)
        if imbalance >= cfg.imbalance_warning_ratio:
            warnings.append(f"class imbalance: the largest class has {imbalance}x the documents of the smallest "
                            "(consider re-weighting, resampling or `haina data augment`)")
    if kept == 0:
        top = max(dropped, key=dropped.get) if dropped else None
        if top == "malformed_record":  # e.g. every JSON record lacks the text field: no filter is to blame
            warnings.append("every document was dropped, most as malformed records: check --text-field and the "
                            "input format (the reasons are in rejects/malformed_record.jsonl.zst)")
        else:
            warnings.append("every document was dropped: loosen the filters (--filters none) or check the input")
    if skipped:
        warnings.append(f"{len(skipped)} file(s) of unknown format skipped (see read.skipped_files)")

    report = {
        "documents": {"in": n_in, "kept": kept, "dropped": sum(dropped.values()),
                      "by_reason": dict(sorted(dropped.items(), key=lambda kv: -kv[1]))},
        "accounting": {"equation": equation, "holds": True},
        "stages": {
            "read": {"files": len(units), "documents": n_in, "malformed_record": dropped.get("malformed_record", 0),
                     "invalid_utf8_records": sum(s.get("invalid_utf8", 0) for s in unit_stats),
                     "skipped_files": skipped},
            "normalize": {"empty": dropped.get("empty", 0)},
            "filters": {"enabled": list(cfg.filters), "dropped": filter_reasons, "c4_lines_removed": dict(c4_lines)},
            # replaced: in documents that passed the filters (kept or deduplicated); replaced_in_rejects: in records
            # dropped before the PII stage (malformed, empty, filtered), scrubbed before they were written.
            "pii": {"enabled": cfg.pii, "replaced": _by_kind(pii), "replaced_in_rejects": _by_kind(pii_rejects)},
            "dedup": {"enabled": list(cfg.dedup), "exact_duplicate": dropped.get("exact_duplicate", 0),
                      "near_duplicate": dropped.get("near_duplicate", 0), **dedup_info},
        },
        "splits": written["splits"],
        "lengths_words": {"before": before.summary(), "after": after.summary()},
        "labels": {s: {label_name(k): v for k, v in sorted(c.items())} for s, c in labels.items() if c},
        "class_balance": {label_name(k): v for k, v in sorted(balance.items())},
        "imbalance_ratio": imbalance,
        "top_sources": written["sources"].most_common(10),
        "warnings": warnings,
        "timings": {**timings, "docs_per_second": round(n_in / max(sum(timings.values()), 1e-9), 1)},
        "config": to_dict(cfg),
    }
    _plot_lengths(out / "lengths.png", before, after)
    if balance:
        _plot_classes(out / "classes.png", report["class_balance"])
    write_json(out / "report.json", report)
    write_text(out / "report.md", render_markdown(report))
    for w in warnings:
        info(f"warning: {w}")
    return report


def _by_kind(counts: Counter) -> dict[str, int]:
    """Replacement counts in the scrubber's order of kinds."""
    return {k: counts[k] for k in KINDS if counts.get(k)}


def _kinds_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "none"


def render_markdown(r: dict) -> str:
    """The human-readable report."""
    d = r["documents"]
    lines = ["# Data preparation report", "", (f"**{d['in']:,} documents in, {d['kept']:,} kept, "
             f"{d['dropped']:,} dropped.**"), "", "Accounting (checked): `" + r["accounting"]["equation"] + "`", ""]
    if r["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in r["warnings"]] + [""]
    lines += ["## Dropped documents by reason", "", "| reason | documents | share of input |", "|---|---:|---:|"]
    for reason, n in d["by_reason"].items():
        lines.append(f"| {reason} | {n:,} | {100 * n / max(d['in'], 1):.1f} % |")
    st = r["stages"]
    lines += ["", "Every dropped document is in `rejects/<reason>.jsonl.zst`.", "", "## Stages", "",
              (f"- read: {st['read']['files']} file(s), {st['read']['documents']:,} records, "
              f"{st['read']['malformed_record']:,} malformed, {st['read']['invalid_utf8_records']:,} with invalid UTF-8 "
              "(decoded with U+FFFD)"),
              f"- normalize: {st['normalize']['empty']:,} empty",
              f"- filters ({', '.join(st['filters']['enabled']) or 'none'}): "
              f"{sum(st['filters']['dropped'].values()):,} dropped; C4 lines removed: "
              + (", ".join(f"{k.removeprefix('c4_lines_')} {v:,}" for k, v in st["filters"]["c4_lines_removed"].items())
                 or "none"),
              "- PII replaced: " + _kinds_text(st["pii"]["replaced"]) + "; in rejected documents: "
              + _kinds_text(st["pii"].get("replaced_in_rejects", {}))
              if st["pii"]["enabled"] else "- PII: not scrubbed (--pii turns it on)",
              f"- dedup ({', '.join(st['dedup']['enabled']) or 'none'}): {st['dedup']['exact_duplicate']:,} exact, "
              f"{st['dedup']['near_duplicate']:,} near duplicates in {st['dedup']['clusters']:,} clusters"
              + (f" (LSH {st['dedup']['bands']} bands × {st['dedup']['rows']} rows)" if st["dedup"]["bands"] else ""),
              ""]
    pii = st["pii"]
    if pii["enabled"]:
        rejected = pii.get("replaced_in_rejects", {})
        lines += ["## PII replaced", "", "| kind | placeholder | in documents | in rejected documents |",
                  "|---|---|---:|---:|"]
        lines += [f"| {k} | `{PLACEHOLDERS[k]}` | {pii['replaced'].get(k, 0):,} | {rejected.get(k, 0):,} |"
                  for k in KINDS]
        lines += ["", "Every record is scrubbed before it is written, rejects included.", ""]
    lines += ["## Splits", "", "| split | documents | shards |", "|---|---:|---:|"]
    for s, v in r["splits"].items():
        lines.append(f"| {s} | {v['documents']:,} | {len(v['shards'])} |")
    lines += ["", "## Document length (words; characters in scripts without spaces)", "",
              "| | documents | mean | min | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for k in ("before", "after"):
        s = r["lengths_words"][k]
        if s["documents"]:
            lines.append(f"| {k} | {s['documents']:,} | {s['mean']} | {s['min']} | ≤{s['p50']} | ≤{s['p90']} | "
                         f"≤{s['p99']} | {s['max']} |")
    lines += ["", "![document lengths](lengths.png)", ""]
    if r["class_balance"]:
        lines += ["## Class balance", "", "| label | " + " | ".join(r["labels"]) + " | total |",
                  "|---|" + "---:|" * (len(r["labels"]) + 1)]
        for label, total in r["class_balance"].items():
            cells = " | ".join(f"{r['labels'][s].get(label, 0):,}" for s in r["labels"])
            lines.append(f"| {label} | {cells} | {total:,} |")
        lines += ["", f"Imbalance (largest / smallest class): {r['imbalance_ratio']}", "",
                  "![class balance](classes.png)", ""]
    if r["stages"]["dedup"]["largest_clusters"]:
        sizes = ", ".join(f"{n}×{size}" for size, n in r["stages"]["dedup"]["cluster_size_counts"].items())
        lines += ["## Duplicate clusters", "", f"Clusters by size (count×size): {sizes}", ""]
    lines += ["## Top sources", "", "| source | kept documents |", "|---|---:|"]
    lines += [f"| {src} | {n:,} |" for src, n in r["top_sources"]]
    t = r["timings"]
    lines += ["", (f"Time: filter {t['filter_s']} s, dedup {t['dedup_s']} s, write {t['write_s']} s "
              f"({t['docs_per_second']:,} documents/s overall)."), ""]
    return "\n".join(lines)


def _figure():
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    return Figure(figsize=(7, 3.5), dpi=100)


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def _plot_lengths(path: Path, before: LengthHistogram, after: LengthHistogram) -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    edges = [max(e, 0.5) for e in _EDGES] + [_EDGES[-1] * 1.26]
    for hist, label in ((before, "before"), (after, "after")):
        if hist.n:
            ax.stairs(hist.counts, edges, label=f"{label} ({hist.n:,} docs)", fill=label == "before",
                      alpha=0.4 if label == "before" else 1.0)
    ax.set_xscale("log")
    hi = max(before.hi, after.hi, 1)
    ax.set_xlim(0.5, 10 ** math.ceil(math.log10(hi + 1)))
    ax.set_xlabel("document length (words)")
    ax.set_ylabel("documents")
    ax.legend()
    _save(fig, path)


def _plot_classes(path: Path, balance: dict[str, int]) -> None:
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    items = sorted(balance.items(), key=lambda kv: -kv[1])[:50]
    ax.bar([str(k) for k, _ in items], [v for _, v in items])
    ax.set_ylabel("documents")
    ax.set_title("class balance (kept documents)")
    ax.tick_params(axis="x", rotation=45)
    _save(fig, path)
