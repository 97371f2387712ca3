"""Calibration: do a classifier's probabilities mean what they say?

Expected calibration error (Guo et al., 2017) sorts the predictions into 15 equal-width bins of their
top-label confidence (the probability of the predicted class) and averages |accuracy - confidence| over
the bins, weighted by how many predictions each holds. Bin b covers (b/15, (b+1)/15], the first also 0.
The maximum calibration error is the worst non-empty bin's gap. The Brier score is the mean squared
distance between the probabilities and the one-hot truth, summed over classes (Brier's original form,
in [0, 2]; scikit-learn's `brier_score_loss(..., scale_by_half=False)`).

Multi-label classifiers make one yes/no decision per label: each (example, label) pair is a binary
prediction with confidence max(p, 1 - p), and the Brier score is the mean of (p - y)² over all pairs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

N_BINS = 15


def bin_edges(n_bins: int = N_BINS) -> np.ndarray:
    """The n_bins + 1 equal-width edges on [0, 1]."""
    return np.linspace(0.0, 1.0, n_bins + 1)


def calibration_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> list[dict[str, Any]]:
    """Per bin: its edges, how many predictions fall in it, their mean confidence and their accuracy.

    Args:
        confidence: (M,) the probability each prediction gave its own answer.
        correct: (M,) whether that answer was right.
        n_bins: equal-width bins on [0, 1]; bin b holds confidences in (edges[b], edges[b+1]].
    """
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)
    hit = np.asarray(correct, dtype=np.float64).reshape(-1)
    edges = bin_edges(n_bins)
    # The number of inner edges strictly below a confidence is its bin: a value on an edge goes to the lower bin.
    which = np.searchsorted(edges[1:-1], conf, side="left")
    count = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=conf, minlength=n_bins)
    hit_sum = np.bincount(which, weights=hit, minlength=n_bins)
    out = []
    for b in range(n_bins):
        n = int(count[b])
        out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n,
                    "confidence": float(conf_sum[b] / n) if n else None,
                    "accuracy": float(hit_sum[b] / n) if n else None})
    return out


def _decisions(probabilities: np.ndarray, y_true: np.ndarray, multi_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) of every decision: one per example, or one per (example, label) pair."""
    p = np.asarray(probabilities, dtype=np.float64)
    if multi_label:
        y = np.asarray(y_true).astype(bool).reshape(p.shape)
        return np.maximum(p, 1.0 - p).reshape(-1), ((p >= 0.5) == y).reshape(-1)
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    return p.max(1), p.argmax(1) == y


def expected_calibration_error(probabilities: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS,
                               multi_label: bool = False) -> float:
    """ECE: Σ_b (n_b / N) · |accuracy_b - confidence_b| over the top-label confidence bins."""
    return calibration(probabilities, y_true, n_bins=n_bins, multi_label=multi_label)["ece"]


def brier_score(probabilities: np.ndarray, y_true: np.ndarray, multi_label: bool = False) -> float:
    """Mean over examples of Σ_c (p_c - onehot_c)²; multi-label: mean of (p - y)² over every (example, label)."""
    p = np.asarray(probabilities, dtype=np.float64)
    if multi_label:
        return float(np.mean((p - np.asarray(y_true, dtype=np.float64).reshape(p.shape)) ** 2))
    onehot = np.eye(p.shape[1])[np.asarray(y_true, dtype=np.int64).reshape(-1)]
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


def calibration(probabilities: np.ndarray, y_true: np.ndarray, n_bins: int = N_BINS,
                multi_label: bool = False) -> dict[str, Any]:
    """{ece, mce, brier, bins}: the calibration of (N, C) probabilities against the true classes.

    Args:
        probabilities: (N, C) softmax rows, or independent sigmoids with `multi_label`.
        y_true: (N,) class indices, or an (N, C) 0/1 matrix with `multi_label`.
        n_bins: equal-width confidence bins.
        multi_label: score every (example, label) yes/no decision.
    """
    conf, correct = _decisions(probabilities, y_true, multi_label)
    if not conf.size:
        return {"ece": None, "mce": None, "brier": None, "bins": calibration_bins(conf, correct, n_bins)}
    bins = calibration_bins(conf, correct, n_bins)
    total = sum(b["count"] for b in bins)
    gaps = [(b["count"], abs(b["accuracy"] - b["confidence"])) for b in bins if b["count"]]
    return {"ece": float(sum(n * g for n, g in gaps) / total), "mce": float(max(g for _, g in gaps)),
            "brier": brier_score(probabilities, y_true, multi_label), "bins": bins}


def reliability_png(bins: list[dict[str, Any]], path: str | os.PathLike, title: str = "",
                    ece: float | None = None) -> None:
    """A reliability diagram: accuracy per confidence bin against the diagonal, with the bin counts below.

    Args:
        bins: `calibration_bins` (or `calibration(...)["bins"]`).
        path: the PNG to write.
        title: the figure's title.
        ece: shown in the title when given.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo = np.array([b["lo"] for b in bins])
    width = np.array([b["hi"] - b["lo"] for b in bins])
    acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins])
    conf = np.array([b["confidence"] if b["count"] else np.nan for b in bins])
    count = np.array([b["count"] for b in bins])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.2, 5.6), dpi=120, sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.bar(lo, acc, width=width, align="edge", edgecolor="black", color="#4C72B0", label="accuracy")
    gap_lo, gap_hi = np.minimum(acc, np.nan_to_num(conf)), np.maximum(acc, np.nan_to_num(conf))
    shown = count > 0
    top.bar(lo[shown], (gap_hi - gap_lo)[shown], bottom=gap_lo[shown], width=width[shown], align="edge",
            color="#DD8452", alpha=0.45, hatch="//", edgecolor="#DD8452", label="gap to confidence")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left", fontsize=8)
    head = title or "reliability diagram"
    top.set_title(head + (f" (ECE {ece:.4f})" if ece is not None else ""))
    bottom.bar(lo, count, width=width, align="edge", edgecolor="black", color="#8C8C8C")
    for x, w, n in zip(lo, width, count, strict=True):
        if n:
            bottom.text(x + w / 2, n, str(int(n)), ha="center", va="bottom", fontsize=6)
    bottom.set_ylabel("count")
    bottom.set_xlabel("confidence")
    bottom.set_xlim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


__all__ = ["N_BINS", "bin_edges", "brier_score", "calibration", "calibration_bins", "expected_calibration_error",
           "reliability_png"]
