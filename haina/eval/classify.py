"""`haina eval classify`: the metrics and calibration of a classifier checkpoint on labeled data.

The data is a JSONL, CSV, TSV or Parquet file of records with a text field and a label field. Labels are
mapped through the checkpoint's label map (`haina.model.classifier.label_name`: strings as they are,
integers as digits); a multi-label classifier reads a list of names (in CSV/TSV a JSON list, or names
separated by commas). What cannot be scored is counted, never a crash: a record without a label is left
out, and so is a label the model never saw in training (for multi-label data, that name is dropped from its
record); the report says how many of each, and which labels. Every record with a text is still predicted and
written to predictions.jsonl, scored or not.

The metrics are `haina.eval.metrics` (equal to scikit-learn's) and `haina.eval.calibration` (15-bin ECE on
the top-label confidence, Brier score), with confusion.png and reliability.png. Options add MC-dropout
uncertainty (`haina.eval.uncertainty`), the metrics on noisy text (`haina.eval.noise`) and per group
(`haina.eval.groups`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from haina.core.errors import HainaError
from haina.core.log import info, progress
from haina.data.records import Labeled, label_records, read_records

KIND = "classify"
SHOWN_UNSEEN = 20  # unseen label names listed in report.md (all are in report.json)


# ---------------------------------------------------------------------------------------- scoring
def scores(y_true: np.ndarray, proba: np.ndarray, labels: tuple[str, ...], multi_label: bool) -> dict[str, Any]:
    """The classification report and the calibration of one set of predictions."""
    from haina.eval.calibration import calibration
    from haina.eval.metrics import classification_report

    report = classification_report(y_true, None, proba, labels, multi_label=multi_label)
    report["calibration"] = calibration(proba, y_true, multi_label=multi_label)
    return report


def _headline(rep: dict[str, Any]) -> dict[str, Any]:
    return {"accuracy": rep["accuracy"], "macro_f1": rep["macro_f1"], "ece": rep["calibration"]["ece"]}


def _mc_metrics(model, ids: list[list[int]], y_true: np.ndarray, multi_label: bool, passes: int, p: float,
                batch_size: int, pad_id: int, seed: int) -> dict[str, float]:
    """K passes with dropout on: predictive entropy, mutual information, and how well they flag errors.

    A multi-label head makes one yes/no decision per label: each (record, label) pair is a two-class
    prediction here, and an error is a wrong decision.
    """
    from haina.eval.uncertainty import (
        mean_prediction_errors,
        mutual_information,
        predictive_entropy,
        uncertainty_summary,
    )

    torch.manual_seed(seed)
    bar = progress(total=passes * len(ids), desc="MC dropout", unit="text")
    with mc_dropout_on(model, p):
        runs = [model.predict_ids(ids, batch_size, pad_id, on_batch=bar.update) for _ in range(passes)]
    bar.close()
    probs = torch.from_numpy(np.stack(runs)).double()  # (K, N, C)
    if multi_label:
        probs = torch.stack([1.0 - probs, probs], dim=-1).flatten(1, 2)  # (K, N·C, 2): no / yes per pair
        targets = torch.from_numpy(np.asarray(y_true).reshape(-1))
    else:
        targets = torch.from_numpy(np.asarray(y_true))
    errors = mean_prediction_errors(probs, targets)
    out = uncertainty_summary(predictive_entropy(probs).numpy(), mutual_information(probs).numpy(),
                              errors.numpy(), prefix="mc_")
    return {"mc_passes": passes, **out}


def mc_dropout_on(model, p: float):
    """`haina.eval.uncertainty.mc_dropout` on the classifier's backbone (the head has no dropout)."""
    from haina.eval.uncertainty import mc_dropout

    return mc_dropout(model.backbone, p)


# ---------------------------------------------------------------------------------------- markdown
def _fmt(v: Any) -> str:
    from haina.eval.report import fmt

    return fmt(v)


def _per_class_table(rep: dict[str, Any]) -> str:
    from haina.eval.report import markdown_table

    rows = [[name, m["precision"], m["recall"], m["f1"], m["support"], m["predicted"], m["roc_auc"], m["pr_auc"]]
            for name, m in rep["per_class"].items()]
    return markdown_table(["class", "precision", "recall", "F1", "support", "predicted", "ROC-AUC", "PR-AUC"], rows)


def _confusion_table(rep: dict[str, Any]) -> str | None:
    from haina.eval.report import markdown_table

    conf = rep["confusion"]
    if "matrix" not in conf or len(conf["labels"]) > 20:  # the PNG shows larger ones
        return None
    rows = [[f"**{name}**", *row] for name, row in zip(conf["labels"], conf["matrix"], strict=True)]
    return "rows: true class; columns: predicted\n\n" + markdown_table(["true \\ predicted", *conf["labels"]], rows)


def _skipped_line(data: Labeled, multi_label: bool) -> str:
    parts = []
    if data.unseen:
        names = sorted(data.unseen, key=lambda k: (-data.unseen[k], k))
        shown = ", ".join(f"`{k}` ({data.unseen[k]})" for k in names[:SHOWN_UNSEEN])
        more = f" and {len(names) - SHOWN_UNSEEN} more" if len(names) > SHOWN_UNSEEN else ""
        what = ("label names dropped from their records" if multi_label
                else "records left out because their label is one the model never saw")
        parts.append(f"{sum(data.unseen.values()):,} {what}: {shown}{more}.")
    if data.unlabeled:
        parts.append(f"{data.unlabeled:,} records have no label and were left out of the metrics.")
    return " ".join(parts)


def _mc_line(passes: int, dropout: float, m: dict[str, Any]) -> str:
    return (f"{passes} passes with dropout {dropout:g}: mean predictive entropy {_fmt(m['mc_entropy'])} nats, mutual "
            f"information {_fmt(m['mc_mutual_info'])}; as error detectors, AUROC {_fmt(m['mc_entropy_auroc'])} "
            f"(entropy) and {_fmt(m['mc_mutual_info_auroc'])} (mutual information).")


def _noise_table(rows: list[dict]) -> str:
    from haina.eval.report import markdown_table

    return markdown_table(["noise", "rate", "accuracy", "macro F1", "ECE"],
                          [[r["noise"], r["rate"], r["accuracy"], r["macro_f1"], r["ece"]] for r in rows])


def _summary(rep: dict[str, Any], data: Labeled, cfg, *, records: int, seconds: float, texts: int,
             truncated: int) -> tuple[dict[str, Any], dict[str, Any], list[tuple[str, str]]]:
    """The report's metrics, details and sections for the main predictions."""
    cal = rep["calibration"]
    keys = ("accuracy", "macro_f1", "micro_f1", "weighted_f1", "roc_auc_macro", "pr_auc_macro")
    metrics: dict[str, Any] = {k: rep[k] for k in keys}
    metrics |= {"ece": cal["ece"], "brier": cal["brier"], "mce": cal["mce"],
                "macro_precision": rep["macro_precision"], "macro_recall": rep["macro_recall"]}
    if cfg.multi_label:
        metrics |= {"subset_accuracy": rep["subset_accuracy"], "hamming_loss": rep["hamming_loss"]}
    # Records left out for an unseen label; for multi-label data, unseen label names dropped from their records.
    metrics |= {"examples": rep["n"], "unseen_labels": sum(data.unseen.values()),
                "texts_per_sec": texts / seconds if seconds > 0 else None}
    details: dict[str, Any] = {
        "labels": list(cfg.labels), "multi_label": cfg.multi_label, "pooling": cfg.pooling,
        "records": records, "scored": rep["n"], "unlabeled": data.unlabeled,
        "unseen_labels": dict(sorted(data.unseen.items(), key=lambda kv: (-kv[1], kv[0]))),
        "truncated": truncated, "seconds": round(seconds, 3), "per_class": rep["per_class"], "confusion": rep["confusion"],
        "calibration_bins": cal["bins"],
        **{f"{a}_{m}": rep[f"{a}_{m}"] for a in ("micro", "weighted") for m in ("precision", "recall")},
    }
    line = f"Scored {rep['n']:,} of {records:,} records ({len(cfg.labels)} classes"
    line += ", multi-label)." if cfg.multi_label else ")."
    if truncated:
        line += f" {truncated:,} texts were longer than the model's context and were cut to their start."
    skipped = _skipped_line(data, cfg.multi_label)
    sections = [("What was scored", line + (" " + skipped if skipped else "")), ("Per class", _per_class_table(rep))]
    table = _confusion_table(rep)
    if table:
        sections.append(("Confusion matrix", table))
    how = ("each (record, label) yes/no decision, confidence max(p, 1 − p)" if cfg.multi_label
           else "the top-label confidence")
    calibration_line = (f"ECE {_fmt(cal['ece'])} (15 equal-width bins over {how}), maximum calibration error "
                        f"{_fmt(cal['mce'])}, Brier score {_fmt(cal['brier'])}.")
    sections.append(("Calibration", calibration_line))
    return metrics, details, sections


def _noise_rows(grid: list[tuple[str, float]], model, tokenizer, texts: list[str], y_true: np.ndarray,
                clean: dict[str, Any], batch_size: int, seed: int) -> list[dict]:
    """accuracy, macro-F1 and ECE per (noise, rate) of `grid`; the clean row is the main run's."""
    from haina.eval.noise import perturb

    rows = []
    for kind, rate in grid:
        rep = clean
        if kind != "clean":
            ids, _ = model.encode([perturb(t, kind, rate, seed) for t in texts], tokenizer)
            rep = scores(y_true, model.predict_ids(ids, batch_size, tokenizer.eos_id), model.cfg.labels,
                         model.cfg.multi_label)
        rows.append({"noise": kind, "rate": rate, **_headline(rep)})
    return rows


# ---------------------------------------------------------------------------------------- the command
def _check_options(batch_size: int, mc_dropout: int, dropout: float) -> None:
    if batch_size < 1:
        raise HainaError(f"--batch-size {batch_size} must be at least 1")
    if mc_dropout < 0:
        raise HainaError(f"--mc-dropout {mc_dropout} must be 0 (off) or a number of passes")
    if mc_dropout and not 0.0 < dropout < 1.0:
        raise HainaError(f"--dropout {dropout} is not in (0, 1)")


def eval_classify_command(checkpoint: str, data: str, out: str, adapter: str | None = None, text_field: str = "text",
                          label_field: str = "label", batch_size: int = 32, mc_dropout: int = 0, dropout: float = 0.1,
                          noise: list[str] | None = None, rates: list[float] | None = None,
                          group_field: str | None = None, seed: int = 0, device: str = "auto",
                          overwrite: bool = False) -> None:
    """Classification metrics and calibration of a classifier checkpoint on labeled data.

    Writes OUT/report.json (accuracy, macro_f1, micro_f1, weighted_f1, roc_auc_macro, pr_auc_macro, ece, brier
    and more; per class and the confusion matrix under details), OUT/report.md, confusion.png, reliability.png
    and predictions.jsonl (id, label, predicted, probabilities per record). A label the model never saw is
    counted and reported, not scored.

    Args:
        checkpoint: a classifier checkpoint or run directory (trained by `haina finetune classify`).
        data: a .jsonl, .csv, .tsv or .parquet file of records with a text and a label.
        out: the report directory (an earlier `eval classify` report there is replaced).
        adapter: LoRA adapters trained on the checkpoint, applied on top (their classifier head, if they have one).
        text_field: the records' text field.
        label_field: the records' label field (a list of labels for a multi-label classifier).
        batch_size: texts per forward pass.
        mc_dropout: K > 0 also runs K passes with dropout on and reports predictive entropy, mutual information
            and how well they flag errors (mc_*).
        dropout: the dropout rate of the MC passes (set for them even if the model trained without dropout).
        noise: perturb the texts and evaluate again: char, word or both (char,word).
        rates: noise rates (default 0, 0.05, 0.1, 0.2).
        group_field: a field of the records to slice by: every metric per group, and the largest gap.
        seed: seeds the noise and the MC-dropout passes.
        device: auto, cpu, cuda, cuda:1 or mps.
        overwrite: replace an OUT that is not an `eval classify` report.
    """
    from haina.core.device import resolve_device
    from haina.core.output import check_output
    from haina.eval.noise import noise_grid
    from haina.model.classifier import head_dir, load_classifier, read_head

    _check_options(batch_size, mc_dropout, dropout)
    grid = noise_grid(noise, rates)
    # No head is one line before the data is read or --out is touched; the data is checked before the model loads.
    cfg, _, _ = read_head(head_dir(checkpoint, adapter))
    check_output(out, f"eval {KIND}", inputs=[p for p in (checkpoint, adapter, data) if p], overwrite=overwrite)
    records = read_records(data)
    if not records:
        raise HainaError(f"--data {data} holds no records")
    labeled = label_records(records, cfg.labels, cfg.multi_label, text_field, label_field, f"--data {data}")
    scored = labeled.scored
    if not scored:
        raise HainaError(f"none of the {len(records):,} records in {data} has a label the model knows "
                         f"({', '.join(cfg.labels[:8])}{', …' if len(cfg.labels) > 8 else ''}); check --label-field")
    groups = None
    if group_field:
        from haina.eval.groups import group_values

        groups = group_values([records[i] for i in scored], group_field, f"--data {data}")
    dev = resolve_device(device)
    model, tokenizer = load_classifier(checkpoint, dev, adapter=adapter)
    if tokenizer is None:
        raise HainaError(f"checkpoint {checkpoint} has no tokenizer/ directory; evaluation needs one to read text")

    t0 = time.perf_counter()
    ids, truncated = model.encode(labeled.texts, tokenizer)
    bar = progress(total=len(ids), desc="classify", unit="text")
    proba = model.predict_ids(ids, batch_size, tokenizer.eos_id, on_batch=bar.update)
    bar.close()
    seconds = time.perf_counter() - t0
    y_true = np.stack([labeled.targets[i] for i in scored]) if cfg.multi_label else \
        np.array([labeled.targets[i] for i in scored], dtype=np.int64)
    rep = scores(y_true, proba[scored], cfg.labels, cfg.multi_label)
    cal = rep["calibration"]
    metrics, details, sections = _summary(rep, labeled, cfg, records=len(records), seconds=seconds, texts=len(ids),
                                          truncated=truncated)
    details |= {"text_field": text_field, "label_field": label_field, "batch_size": batch_size, "device": str(dev)}

    if mc_dropout:
        metrics |= _mc_metrics(model, [ids[i] for i in scored], y_true, cfg.multi_label, mc_dropout, dropout,
                               batch_size, tokenizer.eos_id, seed)
        details["mc_dropout"] = {"passes": mc_dropout, "dropout": dropout, "seed": seed}
        sections.append(("MC dropout", _mc_line(mc_dropout, dropout, metrics)))
    noise_rows: list[dict] = []
    if grid:
        noise_rows = _noise_rows(grid, model, tokenizer, [labeled.texts[i] for i in scored], y_true, rep,
                                 batch_size, seed)
        details["noise"] = noise_rows
        sections.append(("Robustness to noise", _noise_table(noise_rows)))
    if groups is not None:
        from haina.eval.groups import groups_markdown, largest_gaps, per_group

        at = np.asarray(scored)
        by_group = per_group(groups, lambda ix: _headline(scores(y_true[ix], proba[at[ix]], cfg.labels,
                                                                 cfg.multi_label)))
        gaps = largest_gaps(by_group)
        details["groups"] = {"field": group_field, "per_group": by_group, "largest_gaps": gaps}
        metrics |= {f"group_gap_{k}": gaps[k]["gap"] for k in ("accuracy", "macro_f1") if k in gaps}
        sections.append((f"By {group_field}", groups_markdown(by_group, gaps)))

    from haina.eval.calibration import reliability_png
    from haina.eval.metrics import confusion_png, multilabel_confusion
    from haina.eval.report import Report, eval_output, print_summary, write_report

    report = Report(kind=KIND, metrics=metrics, details=details, sections=sections, checkpoint=checkpoint,
                    adapter=adapter, data=[data])
    with eval_output(out, KIND, inputs=[checkpoint, adapter, data], overwrite=overwrite) as tmp:
        if cfg.multi_label:
            pred = (proba[scored] >= 0.5).astype(np.int64)
            confusion_png(multilabel_confusion(y_true, pred), cfg.labels, tmp / "confusion.png")
        else:
            confusion_png(rep["confusion"]["matrix"], cfg.labels, tmp / "confusion.png")
        reliability_png(cal["bins"], tmp / "reliability.png", ece=cal["ece"])
        report.images += ["confusion.png", "reliability.png"]
        if noise_rows:
            from haina.eval.noise import plot_metric_vs_noise

            for metric in ("accuracy", "macro_f1"):
                plot_metric_vs_noise([(r["noise"], r["rate"], r[metric]) for r in noise_rows], metric,
                                     tmp / f"{metric}_vs_noise.png", title=f"{metric} against noise")
                report.images.append(f"{metric}_vs_noise.png")
        _write_predictions(tmp / "predictions.jsonl", labeled, proba, cfg.labels, cfg.multi_label, label_field)
        obj = write_report(tmp, report)
    if labeled.unseen:
        info(_skipped_line(labeled, cfg.multi_label))
    print_summary(obj, ["accuracy", "macro_f1", "roc_auc_macro", "ece", "mc_entropy"], out)


def _write_predictions(path: Path, data: Labeled, proba: np.ndarray, labels: tuple[str, ...], multi_label: bool,
                       label_field: str) -> None:
    """One JSON line per record, in input order: id, label (as the data gave it), predicted, probabilities."""
    with open(path, "w", encoding="utf-8") as f:
        for i, (record, p) in enumerate(zip(data.records, proba, strict=True)):
            if multi_label:
                predicted: Any = [labels[c] for c in np.flatnonzero(p >= 0.5)]
            else:
                predicted = labels[int(p.argmax())]
            row = {"id": record.get("id", i), "label": record.get(label_field), "predicted": predicted,
                   "scored": data.targets[i] is not None,
                   "probabilities": {name: float(v) for name, v in zip(labels, p, strict=True)}}
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")


__all__ = ["eval_classify_command", "label_records", "read_records", "scores"]
