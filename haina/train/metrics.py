"""Classification metrics in NumPy: accuracy, precision/recall/F1, confusion, ROC-AUC and PR-AUC.

One module for fine-tuning's validation and test reports and for `haina eval classify` (it sits in train/ so
that both can import it; `haina.eval.metrics` adds the pictures), with numbers that
equal scikit-learn's on the same predictions (tests/eval/test_metrics.py checks every one); scikit-learn
itself is not needed at run time. The conventions, which are scikit-learn's where it has one:

- Labels are indices 0..C-1 into the label names. Single-label `y_true`/`y_pred` are (N,) integer arrays;
  multi-label ones are (N, C) 0/1 matrices, and a label is predicted where its probability is >= 0.5.
- A ratio whose denominator is 0 (precision of a class never predicted, recall of a class never true) is 0:
  scikit-learn's `zero_division=0`. F1 is 2·TP / (2·TP + FP + FN), so it is 0 when both are 0 too.
- Averages run over the classes present in `y_true` or in the predictions (scikit-learn's `labels=None` for
  single-label data). A class absent from both has nothing to measure: its per-class numbers are None and it
  is left out of the averages, rather than pulling macro-F1 down with a 0. Multi-label data follows the same
  rule (scikit-learn gets the same numbers with `labels=` the present ones).
- ROC-AUC and average precision (PR-AUC) are one-vs-rest per class, from the probabilities. A class with no
  positive (or, for ROC-AUC, no negative) example in `y_true` has none: None, not a crash, and not in the
  macro average. Ties in the scores are handled as scikit-learn does (ROC: trapezoids, which equal the
  Mann-Whitney statistic with average ranks; AP: one step per distinct score).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

THRESHOLD = 0.5  # multi-label: a label is predicted where its probability is at least this


# ---------------------------------------------------------------------------------------- helpers
def _divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den is 0 (scikit-learn's zero_division=0)."""
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


def _float_or_none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def as_indices(y: Sequence[int] | np.ndarray, n_classes: int, what: str = "labels") -> np.ndarray:
    """(N,) int64 label indices, checked to lie in [0, n_classes)."""
    arr = np.asarray(y, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n_classes):
        raise ValueError(f"{what} must be class indices in [0, {n_classes}), got {arr.min()}..{arr.max()}")
    return arr


# ---------------------------------------------------------------------------------------- single-label
def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of exact matches; for (N, C) multi-label matrices, of rows matching on every label."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape")
    if not len(y_true):
        return float("nan")
    same = y_true == y_pred
    return float(same.all(axis=1).mean() if same.ndim == 2 else same.mean())


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class (scikit-learn's orientation)."""
    t, p = as_indices(y_true, n_classes, "y_true"), as_indices(y_pred, n_classes, "y_pred")
    return np.bincount(t * n_classes + p, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def _prf(tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> dict[str, Any]:
    """Per-class and averaged precision/recall/F1 from per-class TP, predicted and true counts."""
    precision, recall, f1 = _divide(tp, pred), _divide(tp, true), _divide(2 * tp, pred + true)
    present = (pred + true) > 0
    out: dict[str, Any] = {"precision": precision, "recall": recall, "f1": f1, "present": present}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        kept = values[present]
        out[f"macro_{name}"] = float(kept.mean()) if kept.size else float("nan")
        weights = true[present]
        out[f"weighted_{name}"] = float((kept * weights).sum() / weights.sum()) if weights.sum() else 0.0
    tp_sum, pred_sum, true_sum = tp[present].sum(), pred[present].sum(), true[present].sum()
    out["micro_precision"] = float(_divide(tp_sum, pred_sum))
    out["micro_recall"] = float(_divide(tp_sum, true_sum))
    out["micro_f1"] = float(_divide(2 * tp_sum, pred_sum + true_sum))
    return out


def precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, Any]:
    """Per-class arrays `precision`, `recall`, `f1` (and `present`), plus macro_/micro_/weighted_ averages.

    Single-label (N,) indices or multi-label (N, C) 0/1 matrices; see the module docstring for the rules.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim == 2:
        t, p = y_true.astype(bool), y_pred.astype(bool)
        tp, pred, true = (t & p).sum(0), p.sum(0), t.sum(0)
    else:
        cm = confusion_matrix(y_true, y_pred, n_classes)
        tp, pred, true = np.diag(cm), cm.sum(0), cm.sum(1)
    return _prf(tp.astype(np.float64), pred.astype(np.float64), true.astype(np.float64))


# ---------------------------------------------------------------------------------------- ranking
def binary_roc_auc(y: np.ndarray, score: np.ndarray) -> float | None:
    """Area under the ROC curve of `score` for 0/1 `y`; None without both a positive and a negative."""
    y, score = np.asarray(y).astype(bool), np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U with average ranks for ties: the trapezoidal area scikit-learn computes, in O(N log N).
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based average rank of each distinct score
    ranks = avg_rank[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def binary_average_precision(y: np.ndarray, score: np.ndarray) -> float | None:
    """Average precision (the step-wise area under the PR curve) of `score` for 0/1 `y`; None without positives.

    AP = Σ (R_k - R_{k-1}) · P_k over the distinct scores, highest first: scikit-learn's definition, which does
    not interpolate (interpolation is optimistic).
    """
    y, score = np.asarray(y).astype(bool), np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    if n_pos == 0:
        return None
    order = np.argsort(-score, kind="mergesort")
    s, hits = score[order], y[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # a threshold at each distinct score
    tp = np.cumsum(hits)[last_of_tie]
    seen = last_of_tie + 1
    precision, recall = tp / seen, tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def one_vs_rest(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, Any]:
    """Per-class `roc_auc` and `pr_auc` lists (None where undefined) and their macro averages.

    `y_true` is (N,) indices or an (N, C) 0/1 matrix; `probabilities` is (N, C).
    """
    proba = np.asarray(probabilities, dtype=np.float64)
    n_classes = proba.shape[1]
    y = np.asarray(y_true)
    onehot = y.astype(bool) if y.ndim == 2 else np.eye(n_classes, dtype=bool)[as_indices(y, n_classes)]
    roc = [binary_roc_auc(onehot[:, c], proba[:, c]) for c in range(n_classes)]
    pr = [binary_average_precision(onehot[:, c], proba[:, c]) for c in range(n_classes)]
    return {"roc_auc": roc, "pr_auc": pr, "roc_auc_macro": _mean_or_none(roc), "pr_auc_macro": _mean_or_none(pr)}


# ---------------------------------------------------------------------------------------- multi-label
def multilabel_predictions(probabilities: np.ndarray, threshold: float = THRESHOLD) -> np.ndarray:
    """(N, C) 0/1 predictions: 1 where the probability is at least `threshold`."""
    return (np.asarray(probabilities) >= threshold).astype(np.int64)


def hamming_loss(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Fraction of (example, label) decisions that are wrong."""
    return float(np.mean(np.asarray(y_true).astype(bool) != np.asarray(y_pred).astype(bool)))


def multilabel_confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """(C, 2, 2): for each label [[TN, FP], [FN, TP]] (scikit-learn's `multilabel_confusion_matrix`)."""
    t, p = np.asarray(y_true).astype(bool), np.asarray(y_pred).astype(bool)
    tp, fp, fn = (t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0)
    tn = len(t) - tp - fp - fn
    return np.stack([np.stack([tn, fp], -1), np.stack([fn, tp], -1)], 1)


# ---------------------------------------------------------------------------------------- the report
def classification_report(y_true: Sequence | np.ndarray, y_pred: Sequence | np.ndarray | None,
                          probabilities: np.ndarray | None, labels: Sequence[str], *,
                          multi_label: bool = False) -> dict[str, Any]:
    """Every metric of a set of predictions, as a JSON-ready dict.

    Args:
        y_true: (N,) class indices, or an (N, C) 0/1 matrix with `multi_label`.
        y_pred: the predictions in the same shape; None derives them from `probabilities` (argmax, or >= 0.5).
        probabilities: (N, C) class probabilities (softmax rows, or independent sigmoids with `multi_label`);
            None leaves out ROC-AUC and PR-AUC.
        labels: the C class names, in index order.
        multi_label: y_true and y_pred are 0/1 matrices.

    Returns:
        n, accuracy (subset accuracy for multi-label), macro/micro/weighted precision, recall and F1,
        roc_auc_macro and pr_auc_macro (None without probabilities), `per_class` {name: {precision, recall, f1,
        support, predicted, roc_auc, pr_auc}}, `confusion` ({labels, matrix} with rows = true class; for
        multi-label {label: [[TN, FP], [FN, TP]]}); multi-label adds subset_accuracy and hamming_loss.
    """
    labels = [str(x) for x in labels]
    n_classes = len(labels)
    proba = None if probabilities is None else np.asarray(probabilities, dtype=np.float64)
    if proba is not None and (proba.ndim != 2 or proba.shape[1] != n_classes):
        raise ValueError(f"probabilities must be (N, {n_classes}), got {proba.shape}")
    if multi_label:
        t = np.asarray(y_true, dtype=np.int64).reshape(-1, n_classes)
        if y_pred is None:
            if proba is None:
                raise ValueError("give y_pred or probabilities")
            y_pred = multilabel_predictions(proba)
        p = np.asarray(y_pred, dtype=np.int64).reshape(-1, n_classes)
        support, predicted = t.sum(0), p.sum(0)
    else:
        t = as_indices(y_true, n_classes, "y_true")
        if y_pred is None:
            if proba is None:
                raise ValueError("give y_pred or probabilities")
            y_pred = proba.argmax(1)
        p = as_indices(y_pred, n_classes, "y_pred")
        cm = confusion_matrix(t, p, n_classes)
        support, predicted = cm.sum(1), cm.sum(0)
    if len(t) != len(p) or (proba is not None and len(proba) != len(t)):
        raise ValueError("y_true, y_pred and probabilities differ in length")
    prf = precision_recall_f1(t, p, n_classes)
    ovr = one_vs_rest(t, proba) if proba is not None and len(t) else None
    per_class = {}
    for c, name in enumerate(labels):
        shown = bool(prf["present"][c])
        per_class[name] = {
            "precision": float(prf["precision"][c]) if shown else None,
            "recall": float(prf["recall"][c]) if shown else None,
            "f1": float(prf["f1"][c]) if shown else None,
            "support": int(support[c]), "predicted": int(predicted[c]),
            "roc_auc": ovr["roc_auc"][c] if ovr else None, "pr_auc": ovr["pr_auc"][c] if ovr else None,
        }
    out: dict[str, Any] = {"n": len(t), "accuracy": _float_or_none(accuracy(t, p))}
    if multi_label:
        out["subset_accuracy"] = out["accuracy"]
        out["hamming_loss"] = _float_or_none(hamming_loss(t, p)) if len(t) else None
    for avg in ("macro", "micro", "weighted"):
        for name in ("precision", "recall", "f1"):
            out[f"{avg}_{name}"] = _float_or_none(prf[f"{avg}_{name}"])
    out["roc_auc_macro"] = ovr["roc_auc_macro"] if ovr else None
    out["pr_auc_macro"] = ovr["pr_auc_macro"] if ovr else None
    out["per_class"] = per_class
    if multi_label:
        out["confusion"] = {name: m.tolist() for name, m in zip(labels, multilabel_confusion(t, p), strict=True)}
    else:
        out["confusion"] = {"labels": labels, "matrix": cm.tolist()}
    return out


# ---------------------------------------------------------------------------------------- pictures


__all__ = ["THRESHOLD", "accuracy", "as_indices", "binary_average_precision", "binary_roc_auc",
           "classification_report", "confusion_matrix", "hamming_loss", "multilabel_confusion",
           "multilabel_predictions", "one_vs_rest", "precision_recall_f1"]
