"""Classification metrics for `haina eval classify`: the numbers (from `haina.train.metrics`, shared with
fine-tuning) and the confusion-matrix picture."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from haina.train.metrics import (
    THRESHOLD,
    _divide,
    accuracy,
    as_indices,
    binary_average_precision,
    binary_roc_auc,
    classification_report,
    confusion_matrix,
    hamming_loss,
    multilabel_confusion,
    multilabel_predictions,
    one_vs_rest,
    precision_recall_f1,
)


def confusion_png(confusion: np.ndarray | Sequence, labels: Sequence[str], path: str | os.PathLike,
                  title: str = "") -> None:
    """A PNG of a confusion matrix: cells shaded by the share of their row (the true class), annotated with counts.

    Args:
        confusion: (C, C) counts, rows = true class; or (C, 2, 2) per-label [[TN, FP], [FN, TP]] (multi-label),
            drawn as one small matrix per label.
        labels: the C class names.
        path: the PNG to write.
        title: the figure's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=np.int64)
    labels = [str(x) for x in labels]
    if cm.ndim == 3:
        _multilabel_png(plt, cm, labels, path, title)
        return
    c = len(labels)
    rows = cm.sum(1, keepdims=True)
    share = _divide(cm, rows)
    side = min(14.0, 2.5 + 0.45 * c)
    fig, ax = plt.subplots(figsize=(side + 1.2, side), dpi=120)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(c), labels, rotation=45 if c > 4 else 0, ha="right" if c > 4 else "center")
    ax.set_yticks(range(c), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if c <= 30:  # beyond that the numbers are unreadable; the colours still show the pattern
        for i in range(c):
            for j in range(c):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_title(title or f"confusion matrix (n = {int(cm.sum()):,})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _multilabel_png(plt, cm: np.ndarray, labels: list[str], path, title: str) -> None:
    n = len(labels)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), dpi=120, squeeze=False)
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.axis("off")
            continue
        m = cm[k]
        share = _divide(m, m.sum(1, keepdims=True))
        ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        for i in range(2):
            for j in range(2):
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if share[i, j] > 0.5 else "black")
        ax.set_xticks([0, 1], ["no", "yes"])
        ax.set_yticks([0, 1], ["no", "yes"])
        ax.set_title(labels[k], fontsize=9)
    fig.suptitle(title or "confusion per label (rows: true, columns: predicted)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["THRESHOLD", "accuracy", "as_indices", "binary_average_precision", "binary_roc_auc",
           "classification_report", "confusion_matrix", "confusion_png", "hamming_loss", "multilabel_confusion",
           "multilabel_predictions", "one_vs_rest", "precision_recall_f1"]
