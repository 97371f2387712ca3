"""`haina finetune classify --folds K`: k-fold cross-validation as K ordinary classify runs and their aggregate.

The training records, with the validation records joining them (a prepare output's val split or --val
files), are split into K folds. Fold i's run trains on the other folds and validates on fold i; the test
split (--test files, or a prepare output's test split) is the same held-out test for every fold. Without
one, each fold's model is scored on its own validation fold, and the report says so: those scores lean
optimistic when the best checkpoint or early stopping watched that same fold.

Folds are stratified: each class's examples, shuffled with train.seed, are dealt round-robin, the deal
continuing from class to class, so that every class's count (and every fold's size) differs by at most one
between folds. With --group-field, whole groups go to folds (related examples, such as the chunks of one
document or a near-duplicate cluster, never straddle a fold): largest group first (ties in seeded order),
each into the fold where it leaves the folds' shares of every class, and of all examples, most even.

OUT holds splits/ (fold-1.jsonl … fold-K.jsonl and test.jsonl: the records each fold run reads), fold-1 …
fold-K (ordinary `finetune classify` runs, each loadable by `haina classify` and `haina eval classify`),
report.json (for every scalar metric its mean, sample standard deviation and per-fold values; per-class F1
the same) and report.md (a table: one row per fold, then mean ± std). Running again over an earlier k-fold
output replaces it; --resume continues it fold by fold (each fold run from its latest checkpoint), provided
the data, --folds, --group-field and train.seed give the same folds.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from haina.core.errors import HainaError
from haina.core.io import write_json, write_text
from haina.core.log import info
from haina.core.output import check_output, claim_output
from haina.data.records import iter_records, label_name, prepare_splits
from haina.finetune.base import load_base
from haina.finetune.classify_data import Parsed, read_splits
from haina.finetune.config import FinetuneConfig
from haina.finetune.sft_data import write_rejects
from haina.train.pretrain import claim_run_dir

COMMAND = "finetune classify --folds"
# The scalar metrics of a classify report that are averaged over folds; "loss" is the scored split's loss.
METRICS = ("accuracy", *(f"{avg}_{m}" for avg in ("macro", "micro", "weighted") for m in ("precision", "recall", "f1")),
           "roc_auc_macro", "pr_auc_macro", "loss")
STOP_SIGNALS = ("SIGTERM", "SIGINT")  # the trainer's stopped_because when a signal ended the run
TABLE = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "roc_auc_macro", "pr_auc_macro", "loss")


# ---------------------------------------------------------------------------------------- fold assignment
def check_folds(k: int, *, multi_label: bool = False) -> None:
    """Refuse a fold count or mode that cannot cross-validate, before anything is read."""
    if k < 2:
        raise HainaError(f"--folds {k}: k-fold cross-validation needs at least 2 folds (e.g. --folds 5); leave "
                         "--folds out for a single run")
    if multi_label:
        raise HainaError("--folds does not support --multi-label: folds are stratified by one class per text; "
                         "run without --folds, or hold out --val/--test files")


def stratified_folds(labels: Sequence[str], k: int, seed: int) -> list[int]:
    """The fold (0 … k-1) of each example: every class's examples shuffled, then dealt round-robin.

    The deal goes on from one class to the next (classes in name order) instead of starting each at fold 0,
    so fold sizes differ by at most one as well as each class's counts.
    """
    rng = random.Random(seed)
    by_class: dict[str, list[int]] = {}
    for i, name in enumerate(labels):
        by_class.setdefault(name, []).append(i)
    folds, dealt = [0] * len(labels), 0
    for name in sorted(by_class):
        rows = by_class[name]
        rng.shuffle(rows)
        for j, i in enumerate(rows):
            folds[i] = (dealt + j) % k
        dealt += len(rows)
    return folds


def grouped_folds(labels: Sequence[str], groups: Sequence[str], k: int, seed: int) -> list[int]:
    """The fold of each example with every group whole in one fold, sizes and classes balanced greedily.

    Groups go largest first (equal sizes in a seeded order); the k largest open one fold each, so that no fold
    is empty, and every later one joins the fold where it leaves the spread (standard deviation over folds) of
    each class's share, and of the share of all examples, smallest in sum.
    """
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    if len(members) < k:
        raise HainaError(f"{len(members)} groups cannot fill --folds {k}; lower --folds")
    order = sorted(members)
    random.Random(seed).shuffle(order)
    order.sort(key=lambda g: -len(members[g]))  # stable: groups of one size keep the seeded order
    classes = {name: c for c, name in enumerate(sorted(set(labels)))}
    counts = np.zeros((len(order), len(classes) + 1))  # per group: examples of each class, then all of them
    for r, g in enumerate(order):
        for i in members[g]:
            counts[r, classes[labels[i]]] += 1
    counts[:, -1] = counts[:, :-1].sum(1)
    share = counts / counts.sum(0)  # each group's share of each class's examples (and of all examples)
    filled, eye = np.zeros((k, share.shape[1])), np.eye(k)[:, :, None]
    folds = [0] * len(labels)
    for r, g in enumerate(order):
        if r < k:
            f = r
        else:
            trial = filled[None] + eye * share[r]  # (candidate fold, fold, column): the shares if g joined it
            f = int(np.argmin(trial.std(axis=1).sum(axis=1)))
        filled[f] += share[r]
        for i in members[g]:
            folds[i] = f
    return folds


def assign_folds(labels: Sequence[str], k: int, seed: int, groups: Sequence[str] | None = None,
                 group_field: str | None = None) -> list[int]:
    """Stratified (or grouped) folds, refused in one line when the smallest class or the groups are too few."""
    counts = Counter(labels)
    name, smallest = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if k > smallest:
        fix = f"lower --folds to {smallest} or below" if smallest > 1 else "give it more examples or leave it out"
        raise HainaError(f"--folds {k} is more than the {smallest} example{'s' if smallest > 1 else ''} of class "
                         f"'{name}', the smallest; every fold must validate on every class, so {fix}")
    if groups is None:
        return stratified_folds(labels, k, seed)
    n_groups = len(set(groups))
    if n_groups < k:
        fix = f"lower --folds to {n_groups} or below" if n_groups > 1 else "group by a field with more values"
        raise HainaError(f"--group-field {group_field} gives {n_groups} group{'s' if n_groups > 1 else ''}, fewer than "
                         f"--folds {k}; {fix}")
    return grouped_folds(labels, groups, k, seed)


# ---------------------------------------------------------------------------------------- records
def _group_name(value: Any) -> str | None:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, sort_keys=True, default=str) if value else None
    return label_name(value)


def _group_of(record: dict, group_field: str) -> str | None:
    """The record's group: its own field, or (a prepare output's records) the field inside `meta`."""
    if group_field in record:
        return _group_name(record[group_field])
    meta = record.get("meta")
    if isinstance(meta, str):  # Parquet shards keep meta as a JSON string
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = None
    return _group_name(meta.get(group_field)) if isinstance(meta, dict) else None


def read_groups(paths: Sequence[str | Path], parsed: Parsed, group_field: str, what: str) -> list[str]:
    """The group of each usable record of `parsed` (read from `paths`), in its order; refused if any has none.

    A record is usable unless `parse_records` rejected it, which it records by file and line.
    """
    rejected = {(r["source"], r["line"]) for r in parsed.rejects}
    groups: list[str | None] = []
    first = None
    for path in paths:
        for n, record in enumerate(iter_records(path, what=what), 1):
            if (str(path), n) in rejected:
                continue
            groups.append(_group_of(record, group_field))
            if groups[-1] is None and first is None:
                first = f"{path} record {n}"
    if len(groups) != len(parsed.texts):  # the files changed while they were read
        raise HainaError(f"{what}: the records changed while they were read; run again")
    missing = sum(g is None for g in groups)
    if missing:
        raise HainaError(f"--group-field {group_field}: {missing:,} of {len(groups):,} records have no '{group_field}' "
                         f"(the first: {first}); give every record a group, or leave --group-field out")
    return groups  # type: ignore[return-value]


def _pool_paths(cfg: FinetuneConfig, source: str) -> tuple[list, list]:
    """The files read_splits read for train and val, in its order."""
    if source == "prepare":
        files = prepare_splits(cfg.data.train[0]) or {}
        return list(files["train"]), list(cfg.data.val) or list(files["val"])
    return list(cfg.data.train), list(cfg.data.val)


def _jsonl(texts: Sequence[str], names: Sequence[str], cfg: FinetuneConfig, groups: Sequence[str] | None = None,
           group_field: str | None = None) -> str:
    c = cfg.classify
    rows = []
    for i, (text, name) in enumerate(zip(texts, names, strict=True)):
        row = {c.text_field: text, c.label_field: name}
        if groups is not None and group_field not in row:
            row[group_field] = groups[i]
        rows.append(json.dumps(row, ensure_ascii=False) + "\n")
    return "".join(rows)


# ---------------------------------------------------------------------------------------- the runs
def run_kfold(cfg: FinetuneConfig, *, folds: int, group_field: str | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """K classify runs on stratified (or grouped) folds of the labeled records; returns the aggregate report."""
    from haina.finetune.classify import run_classify  # classify routes here: imported late, no cycle at load

    c, k, resume = cfg.classify, folds, cfg.train.resume
    check_folds(k, multi_label=c.multi_label)
    if not cfg.data.train:
        raise HainaError("--data is required: labeled JSONL, CSV, TSV or Parquet files, or a `haina data prepare` "
                         "output directory")
    if not cfg.out:
        raise HainaError("--out is required: the directory for the fold runs and their aggregate")
    out = Path(cfg.out)
    inputs = [str(p) for p in (*cfg.data.train, *cfg.data.val, *c.test, cfg.base) if p]
    if resume:
        claim_run_dir(out, COMMAND, inputs=inputs, resume=True, overwrite=overwrite, check_only=True)
    else:
        check_output(out, COMMAND, inputs=inputs, overwrite=overwrite)
    load_base(cfg.base)  # a bad --base is refused now, before anything is written (each fold loads its own)

    parsed, source = read_splits(cfg.data.train, cfg.data.val, c.test, text_field=c.text_field,
                                 label_field=c.label_field, multi_label=False)
    texts = parsed["train"].texts + parsed["val"].texts
    names = [n[0] for n in parsed["train"].names + parsed["val"].names]
    groups = None
    if group_field:
        train_paths, val_paths = _pool_paths(cfg, source)
        groups = read_groups(train_paths, parsed["train"], group_field, "--data") + \
            read_groups(val_paths, parsed["val"], group_field, "--val")
    assignment = assign_folds(names, k, cfg.train.seed, groups, group_field)
    rows = [[i for i, f in enumerate(assignment) if f == j] for j in range(k)]
    files = {f"fold-{j + 1}.jsonl": _jsonl([texts[i] for i in r], [names[i] for i in r], cfg,
                                           None if groups is None else [groups[i] for i in r], group_field)
             for j, r in enumerate(rows)}
    test = parsed["test"]
    if test.texts:
        files["test.jsonl"] = _jsonl(test.texts, [n[0] for n in test.names], cfg)
    splits = out / "splits"
    if resume and splits.is_dir():
        earlier = {p.name: p for p in splits.glob("*.jsonl")}
        if set(earlier) != set(files) or any(p.read_text(encoding="utf-8") != files[n] for n, p in earlier.items()):
            raise HainaError(f"cannot --resume {out}: its folds differ from these (the data, --folds, --group-field "
                                 "or train.seed changed); resume with the same ones, or run again without --resume")
    _warn_thin_classes(names, groups, k)

    extra = {"folds": k, "group_field": group_field}
    if resume:
        claim_run_dir(out, COMMAND, inputs=inputs, resume=True, overwrite=overwrite, extra=extra)
    else:
        claim_output(out, COMMAND, inputs=inputs, overwrite=overwrite, extra=extra)
    for name, text in files.items():
        write_text(splits / name, text)
    rejects = [r for s in ("train", "val", "test") for r in parsed[s].rejects]
    if rejects:
        write_rejects(out / "rejects.jsonl", rejects)
        info(f"{len(rejects)} records left out before the folds were made; kept with their reasons in "
             f"{out / 'rejects.jsonl'}")

    fold_files = [str(splits / f"fold-{j + 1}.jsonl") for j in range(k)]
    test_files = (str(splits / "test.jsonl"),) if test.texts else ()
    reports, stopped = [], None
    for j in range(k):
        info(f"fold {j + 1}/{k}: training on {len(texts) - len(rows[j]):,} examples, validating on {len(rows[j]):,}")
        fold_cfg = dataclasses.replace(
            cfg, out=str(out / f"fold-{j + 1}"),
            data=dataclasses.replace(cfg.data, train=tuple(f for i, f in enumerate(fold_files) if i != j),
                                     val=(fold_files[j],)),
            classify=dataclasses.replace(c, test=test_files, test_fraction=0.0))
        fold = run_classify(fold_cfg, overwrite=False)
        if fold.get("stopped_because") in STOP_SIGNALS:  # the trainer caught Ctrl-C or SIGTERM: stop here, too
            stopped = fold["stopped_because"]
            info(f"fold {j + 1} stopped by {stopped}; the report covers the {j} finished fold{'s' * (j != 1)}, and "
                 "--resume continues from that fold's checkpoint")
            break
        reports.append(fold)

    report = _report(cfg, reports, rows, names, groups, group_field, source, parsed, rejects) | {
        "complete": stopped is None, "stopped_because": stopped}
    write_json(out / "report.json", report)
    write_text(out / "report.md", report_markdown(report))
    return report


def _warn_thin_classes(names: Sequence[str], groups: Sequence[str] | None, k: int) -> None:
    if groups is None:
        return
    spread: dict[str, set[str]] = {}
    for name, g in zip(names, groups, strict=True):
        spread.setdefault(name, set()).add(g)
    thin = sorted(name for name, gs in spread.items() if len(gs) < k)
    if thin:
        info(f"classes in fewer groups than folds ({', '.join(thin[:6])}): some folds validate without them, and a "
             "class in one group only is missing from one fold's training")


# ---------------------------------------------------------------------------------------- the aggregate
def fold_scores(report: dict[str, Any]) -> dict[str, float | None]:
    """A fold run's scalar metrics (METRICS), `loss` being the loss on the split it was scored on."""
    split = report.get("evaluated_on")
    values = {name: report.get(name) for name in METRICS if name != "loss"}
    values["loss"] = report.get(f"{split}_loss") if split else None
    return {k: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
            for k, v in values.items()}


def summarize(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1) of the folds' values that exist, and the values themselves."""
    have = [v for v in values if v is not None]
    return {"mean": float(np.mean(have)) if have else None,
            "std": float(np.std(have, ddof=1)) if len(have) > 1 else None, "folds": list(values)}


def _report(cfg: FinetuneConfig, reports: list[dict[str, Any]], rows: list[list[int]], names: list[str],
            groups: list[str] | None, group_field: str | None, source: str, parsed: dict[str, Parsed],
            rejects: list[dict[str, Any]]) -> dict[str, Any]:
    c = cfg.classify
    split = reports[0].get("evaluated_on") if reports else None
    scores = [fold_scores(r) for r in reports]
    metrics = {m: summarize([s[m] for s in scores]) for m in METRICS}
    labels = list(dict.fromkeys(lab for r in reports for lab in r.get("labels", [])))  # label-map order
    per_class = {lab: summarize([((r.get("per_class") or {}).get(lab) or {}).get("f1") for r in reports])
                 for lab in labels}
    if not reports:
        scored = "no fold finished"
    elif split == "test":
        scored = f"each fold's model on the same held-out test split ({reports[0]['evaluated_examples']:,} examples)"
    else:
        scored = ("each fold's model on its own validation fold (no test split was given); these lean optimistic "
                  f"where the best checkpoint or early stopping watched that fold ({c.select_metric})")
    folds = []
    for j, (r, fold_rows) in enumerate(zip(reports, rows[:len(reports)], strict=True)):
        folds.append({"run": f"fold-{j + 1}", "train_examples": len(names) - len(fold_rows),
                      "val_examples": len(fold_rows), "val_class_counts": dict(Counter(names[i] for i in fold_rows)),
                      "groups": None if groups is None else len({groups[i] for i in fold_rows}),
                      "steps": r.get("steps"), "stopped_because": r.get("stopped_because"),
                      "selection": r.get("selection"), "scores": scores[j]})
    return {
        "method": "classify", "folds": len(rows), "finished_folds": len(reports),
        "split": {"stratified_by": c.label_field, "group_field": group_field, "seed": cfg.train.seed},
        "evaluated_on": split, "scored": scored, "metrics": metrics, "per_class_f1": per_class, "fold_runs": folds,
        "labels": labels, "lora": cfg.lora.r > 0, "select_metric": c.select_metric,
        "imbalance": {"class_weights": c.class_weights, "loss": c.loss, "sampling": c.sampling,
                      "focal_gamma": c.focal_gamma if c.loss == "focal" else None},
        "data": {"source": source, "pooled": {"train": len(parsed["train"].texts), "val": len(parsed["val"].texts)},
                 "test_examples": len(parsed["test"].texts), "rejected": len(rejects),
                 "rejects_by_reason": dict(Counter(r["reason"] for r in rejects).most_common())},
    }


def _cell(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "–"
    return f"{value:.4f}" if std is None else f"{value:.4f} ± {std:.4f}"


def report_markdown(report: dict[str, Any]) -> str:
    """The k-fold table: one row per fold, then mean ± std (sample standard deviation)."""
    how = f"grouped by '{report['split']['group_field']}', " if report["split"]["group_field"] else ""
    title = (f"# {report['folds']}-fold cross-validation ({how}stratified by '{report['split']['stratified_by']}', "
             f"seed {report['split']['seed']})")
    stop = "" if report.get("complete", True) else (f" Stopped by {report['stopped_because']} after "
                                                     f"{report['finished_folds']} folds; continue with --resume.")
    lines = [title, "", f"Scored: {report['scored']}.{stop}", "",
             "| fold | train | val | " + " | ".join(TABLE) + " |", "|---|---:|---:|" + "---:|" * len(TABLE)]
    for fold in report["fold_runs"]:
        lines.append(f"| {fold['run']} | {fold['train_examples']:,} | {fold['val_examples']:,} | "
                     + " | ".join(_cell(fold["scores"][m]) for m in TABLE) + " |")
    agg = report["metrics"]
    lines.append("| mean ± std | | | " + " | ".join(_cell(agg[m]["mean"], agg[m]["std"]) for m in TABLE) + " |")
    if report["per_class_f1"]:
        lines += ["", "| class | F1 mean ± std |", "|---|---:|"]
        lines += [f"| {name} | {_cell(s['mean'], s['std'])} |" for name, s in report["per_class_f1"].items()]
    return "\n".join(lines) + "\n"


def kfold_summary(report: dict[str, Any], out: str | None) -> None:
    """Two lines for the terminal: the headline metrics' mean ± std, and where the runs are."""
    m = report["metrics"]

    def pm(name: str) -> str:
        s = m[name]
        return "–" if s["mean"] is None else f"{s['mean']:.4f} ± {s['std'] or 0.0:.4f}"

    done = "" if report["complete"] else (f" (stopped by {report['stopped_because']} after {report['finished_folds']}; "
                                          "continue with --resume)")
    print(f"{report['folds']} folds{done}, scored on {report['evaluated_on']}: accuracy {pm('accuracy')}, "
          f"macro-F1 {pm('macro_f1')}")
    print(f"runs: {out}/fold-1 … fold-{report['folds']}   report: {out}/report.json, {out}/report.md")


__all__ = ["COMMAND", "METRICS", "assign_folds", "check_folds", "fold_scores", "grouped_folds", "kfold_summary",
           "read_groups", "report_markdown", "run_kfold", "stratified_folds", "summarize"]
