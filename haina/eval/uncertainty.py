"""Uncertainty from Monte-Carlo dropout: K stochastic passes, and what their disagreement says.

With K passes' predictive distributions p_k over C classes (next tokens, or labels), per position:

- predictive entropy H[mean_k p_k]: total uncertainty, high when the averaged prediction is flat;
- expected entropy mean_k H[p_k]: the part each pass already has (aleatoric, noise in the data);
- mutual information = predictive − expected entropy >= 0 (Jensen): how much the passes disagree, the
  model's own (epistemic) uncertainty (Gal & Ghahramani 2016; Houlsby et al. 2011's BALD).

Whether these are useful is measured as error detectors: the AUROC of a score separating the positions
the averaged prediction gets wrong from those it gets right (0.5 is chance), and its point-biserial
correlation with the error indicator. The functions take a (K, N, C) probability tensor; `MCPasses`
gives the same numbers pass by pass, for vocabularies where K copies of (N, C) would not fit in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from haina.core.errors import HainaError


# ---------------------------------------------------------------------------------------- the measures
def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last dimension, with 0·log 0 = 0: (..., C) -> (...)."""
    return torch.special.entr(probs.float()).sum(-1)


def predictive_entropy(probs: torch.Tensor) -> torch.Tensor:
    """H[mean over passes]: (K, N, C) probabilities -> (N,) nats."""
    return entropy(probs.float().mean(0))


def expected_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over passes of each pass's entropy: (K, N, C) -> (N,) nats."""
    return entropy(probs).mean(0)


def mutual_information(probs: torch.Tensor) -> torch.Tensor:
    """Predictive minus expected entropy, (K, N, C) -> (N,) nats; clamped at 0 against rounding (it is >= 0)."""
    return (predictive_entropy(probs) - expected_entropy(probs)).clamp_min(0.0)


def mean_prediction_errors(probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether the argmax of the mean distribution misses the target: (K, N, C), (N,) -> bool (N,)."""
    return probs.float().mean(0).argmax(-1) != targets


class MCPasses:
    """The same measures accumulated one pass at a time: memory of two (N, C) tensors, not K of them.

    Feed each pass's log-probabilities (N, C) to `add`; then read `mean_probs`, `predictive_entropy()`,
    `expected_entropy()` and `mutual_information()`, equal to the functions above on the stacked passes.
    """

    def __init__(self) -> None:
        self.passes = 0
        self._sum_probs: torch.Tensor | None = None
        self._sum_entropy: torch.Tensor | None = None

    def add(self, log_probs: torch.Tensor) -> None:
        """One pass: log-probabilities (N, C) (a log_softmax; float32 is used whatever comes in)."""
        lp = log_probs.float()
        p = lp.exp()
        # -sum p log p, with the 0 * -inf of a zero probability read as 0.
        ent = -(p * lp.clamp_min(torch.finfo(lp.dtype).min)).sum(-1)
        if self._sum_probs is None:
            self._sum_probs, self._sum_entropy = p, ent
        else:
            self._sum_probs += p
            self._sum_entropy += ent
        self.passes += 1

    @property
    def mean_probs(self) -> torch.Tensor:
        if self._sum_probs is None:
            raise ValueError("no pass added")
        return self._sum_probs / self.passes

    def predictive_entropy(self) -> torch.Tensor:
        return entropy(self.mean_probs)

    def expected_entropy(self) -> torch.Tensor:
        if self._sum_entropy is None:
            raise ValueError("no pass added")
        return self._sum_entropy / self.passes

    def mutual_information(self) -> torch.Tensor:
        return (self.predictive_entropy() - self.expected_entropy()).clamp_min(0.0)


# ---------------------------------------------------------------------------------------- as error detectors
def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` ranking positive `labels` above negative ones; NaN without both.

    The Mann-Whitney form: the probability that a random positive outscores a random negative, ties
    counting one half (average ranks), so it needs no thresholds and no scikit-learn.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # Average rank (1-based) over each run of equal scores.
    edges = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate([[0], edges])
    ends = np.concatenate([edges, [len(s)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def point_biserial(scores: np.ndarray, labels: np.ndarray) -> float:
    """The Pearson correlation of `scores` with a 0/1 `labels`; NaN when either does not vary."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(np.float64).ravel()
    if len(s) < 2 or s.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(s, y)[0, 1])


def error_correlation(scores: np.ndarray | torch.Tensor, errors: np.ndarray | torch.Tensor) -> dict[str, float]:
    """How well an uncertainty score flags errors: {"auroc": ..., "point_biserial": ...} (NaN where undefined)."""
    s = scores.detach().cpu().numpy() if isinstance(scores, torch.Tensor) else np.asarray(scores)
    e = errors.detach().cpu().numpy() if isinstance(errors, torch.Tensor) else np.asarray(errors)
    return {"auroc": auroc(s, e), "point_biserial": point_biserial(s, e)}


def uncertainty_summary(pred_entropy: np.ndarray, mutual_info: np.ndarray, errors: np.ndarray,
                        prefix: str = "mc_") -> dict[str, float]:
    """The scalar metrics of an MC-dropout run: mean entropy and MI, error rate, and both as error detectors."""
    h, mi, e = (np.asarray(a).ravel() for a in (pred_entropy, mutual_info, errors))
    out = {f"{prefix}entropy": float(h.mean()) if len(h) else float("nan"),
           f"{prefix}mutual_info": float(mi.mean()) if len(mi) else float("nan"),
           f"{prefix}error_rate": float(e.mean()) if len(e) else float("nan")}
    for name, score in (("entropy", h), ("mutual_info", mi)):
        corr = error_correlation(score, e)
        out[f"{prefix}{name}_auroc"] = corr["auroc"]
        out[f"{prefix}{name}_pb_corr"] = corr["point_biserial"]
    return out


# ---------------------------------------------------------------------------------------- dropout on at eval
def _dropout_holders(model: nn.Module) -> Iterator[nn.Module]:
    for m in model.modules():
        rate = getattr(m, "dropout", None)
        # haina's layers keep their rate as a number attribute `dropout` (applied when `training`).
        if isinstance(m, nn.modules.dropout._DropoutNd) or (isinstance(rate, (int, float))
                                                            and not isinstance(rate, bool)):
            yield m


@contextlib.contextmanager
def mc_dropout(model: nn.Module, p: float) -> Iterator[nn.Module]:
    """Inside the block, `model` applies dropout at rate `p` everywhere it has dropout; restored afterwards.

    A model trained with dropout 0 still has the places (attention weights, residual branches, the
    embeddings, nn.Dropout modules such as LoRA's): their rates are set to `p`, and only the modules that
    apply dropout are switched to training mode, so nothing else that behaves differently in training
    (gradient checkpointing, say) comes on. The caller seeds torch's generator for reproducible passes.
    """
    if not 0.0 < p < 1.0:
        raise HainaError(f"--dropout {p} is not in (0, 1); MC dropout needs a rate such as 0.1")
    saved_training = {m: m.training for m in model.modules()}
    saved: list[tuple[nn.Module, str, object]] = []
    try:
        for m in _dropout_holders(model):
            attr = "p" if isinstance(m, nn.modules.dropout._DropoutNd) else "dropout"
            saved.append((m, attr, getattr(m, attr)))
            setattr(m, attr, float(p))
            m.training = True
        cfg = getattr(model, "cfg", None)
        if dataclasses.is_dataclass(cfg) and any(f.name == "dropout" for f in dataclasses.fields(cfg)):
            # The Transformer reads its embedding dropout from its (frozen) config.
            saved.append((model, "cfg", cfg))
            model.cfg = dataclasses.replace(cfg, dropout=float(p))
        if hasattr(model, "gradient_checkpointing"):
            saved.append((model, "gradient_checkpointing", model.gradient_checkpointing))
            model.gradient_checkpointing = False
        model.training = True
        yield model
    finally:
        for m, attr, value in reversed(saved):
            setattr(m, attr, value)
        for m, was in saved_training.items():
            m.training = was


__all__ = ["MCPasses", "auroc", "entropy", "error_correlation", "expected_entropy", "mc_dropout",
           "mean_prediction_errors", "mutual_information", "point_biserial", "predictive_entropy",
           "uncertainty_summary"]
