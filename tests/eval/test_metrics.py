"""Classification metrics against scikit-learn (installed for the tests only), and calibration by hand."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from haina.eval.calibration import brier_score, calibration, calibration_bins, reliability_png
from haina.eval.metrics import (
    binary_average_precision,
    binary_roc_auc,
    classification_report,
    confusion_png,
    multilabel_confusion,
)


def _labels(c):
    return [f"c{i}" for i in range(c)]


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def check_single_label(y, proba, c):
    """Every number of the report equals scikit-learn's on the same predictions."""
    rep = classification_report(y, None, proba, _labels(c))
    pred = proba.argmax(1)
    present = sorted(set(y) | set(pred))  # scikit-learn's labels=None
    assert rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    for avg in ("macro", "micro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)
        assert (rep[f"{avg}_precision"], rep[f"{avg}_recall"], rep[f"{avg}_f1"]) == \
            pytest.approx((p, r, f), abs=1e-12), avg
    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=present, average=None, zero_division=0)
    for k, cls in enumerate(present):
        m = rep["per_class"][f"c{cls}"]
        assert (m["precision"], m["recall"], m["f1"], m["support"]) == pytest.approx((p[k], r[k], f[k], s[k]))
    for cls in set(range(c)) - set(present):
        assert rep["per_class"][f"c{cls}"]["f1"] is None
    np.testing.assert_array_equal(rep["confusion"]["matrix"], skm.confusion_matrix(y, pred, labels=range(c)))
    rocs, aps = [], []
    for cls in range(c):
        yb = (y == cls).astype(int)
        m = rep["per_class"][f"c{cls}"]
        if 0 < yb.sum() < len(yb):
            rocs.append(skm.roc_auc_score(yb, proba[:, cls]))
            assert m["roc_auc"] == pytest.approx(rocs[-1], abs=1e-12)
        else:
            assert m["roc_auc"] is None
        if yb.sum():
            aps.append(skm.average_precision_score(yb, proba[:, cls]))
            assert m["pr_auc"] == pytest.approx(aps[-1], abs=1e-12)
        else:
            assert m["pr_auc"] is None
    assert rep["roc_auc_macro"] == (pytest.approx(np.mean(rocs), abs=1e-12) if rocs else None)
    assert rep["pr_auc_macro"] == (pytest.approx(np.mean(aps), abs=1e-12) if aps else None)
    if len(set(y)) == c and c > 2:  # scikit-learn's own multi-class OvR needs every class present
        assert rep["roc_auc_macro"] == pytest.approx(skm.roc_auc_score(y, proba, multi_class="ovr"), abs=1e-9)
    return rep


def test_random_predictions_match_sklearn():
    rng = np.random.default_rng(0)
    for c in (2, 3, 7):
        y = rng.integers(0, c, 300)
        proba = _softmax(rng.normal(size=(300, c)) + 2.0 * np.eye(c)[y] * rng.random((300, 1)))
        check_single_label(y, proba, c)


def test_edge_cases_match_sklearn():
    # A class never true but predicted, a class absent everywhere, ties in the scores, one example.
    y = np.array([0, 0, 1, 1, 1])
    proba = np.array([[0.2, 0.2, 0.6, 0.0], [0.6, 0.2, 0.2, 0.0], [0.2, 0.6, 0.2, 0.0], [0.2, 0.6, 0.2, 0.0],
                      [0.6, 0.2, 0.2, 0.0]])
    rep = check_single_label(y, proba, 4)
    assert rep["per_class"]["c2"]["precision"] == 0.0 and rep["per_class"]["c2"]["support"] == 0
    assert rep["per_class"]["c2"]["roc_auc"] is None and rep["per_class"]["c3"]["f1"] is None
    check_single_label(np.array([1]), np.array([[0.3, 0.7]]), 2)  # one example: no AUC, no crash
    check_single_label(np.zeros(6, int), np.full((6, 3), 1 / 3), 3)  # all tied
    perfect = check_single_label(np.array([0, 1, 2, 1]), np.eye(3)[[0, 1, 2, 1]] * 0.9 + 0.1 / 3, 3)
    assert perfect["accuracy"] == perfect["macro_f1"] == perfect["roc_auc_macro"] == 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 5).flatmap(lambda c: st.tuples(
    st.just(c), st.lists(st.tuples(st.integers(0, c - 1), st.lists(st.integers(0, 4), min_size=c, max_size=c)),
                         min_size=1, max_size=40))))
def test_property_single_label_matches_sklearn(case):
    c, rows = case
    y = np.array([r[0] for r in rows])
    scores = np.array([r[1] for r in rows], dtype=float)  # small integers: many ties
    proba = _softmax(scores)
    check_single_label(y, proba, c)


def check_multi_label(y, proba):
    c = y.shape[1]
    rep = classification_report(y, None, proba, _labels(c), multi_label=True)
    pred = (proba >= 0.5).astype(int)
    present = [k for k in range(c) if y[:, k].any() or pred[:, k].any()]
    assert rep["subset_accuracy"] == rep["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert rep["hamming_loss"] == pytest.approx(skm.hamming_loss(y, pred))
    if present:
        for avg in ("macro", "micro", "weighted"):
            want = skm.f1_score(y, pred, labels=present, average=avg, zero_division=0)
            assert rep[f"{avg}_f1"] == pytest.approx(want, abs=1e-12), avg
        f = skm.f1_score(y, pred, labels=present, average=None, zero_division=0)
        for k, cls in enumerate(present):
            assert rep["per_class"][f"c{cls}"]["f1"] == pytest.approx(f[k])
    mcm = skm.multilabel_confusion_matrix(y, pred)
    for k in range(c):
        assert rep["confusion"][f"c{k}"] == mcm[k].tolist()
        if 0 < y[:, k].sum() < len(y):
            assert rep["per_class"][f"c{k}"]["roc_auc"] == pytest.approx(skm.roc_auc_score(y[:, k], proba[:, k]))
        if y[:, k].sum():
            assert rep["per_class"][f"c{k}"]["pr_auc"] == pytest.approx(
                skm.average_precision_score(y[:, k], proba[:, k]))
    return rep


def test_multi_label_matches_sklearn():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 5)) < 0.3).astype(int)
    y[:, 4] = 0  # a label nobody has
    proba = np.clip(0.6 * y + 0.5 * rng.random((200, 5)), 0, 1)
    rep = check_multi_label(y, proba)
    assert rep["per_class"]["c4"]["roc_auc"] is None and rep["per_class"]["c4"]["support"] == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.tuples(st.booleans(), st.sampled_from([0.0, 0.2, 0.5, 0.7, 1.0])), min_size=3,
                         max_size=3), min_size=1, max_size=30))
def test_property_multi_label_matches_sklearn(rows):
    y = np.array([[int(t) for t, _ in r] for r in rows])
    proba = np.array([[p for _, p in r] for r in rows])
    check_multi_label(y, proba)


def test_binary_curves_by_hand():
    # Positives score 0.9 and 0.4, negatives 0.6 and 0.1: 3 of 4 pairs ordered right.
    assert binary_roc_auc(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1])) == 0.75
    # Ranked 0.9 (hit), 0.6 (miss), 0.4 (hit): AP = 1/2 · 1 + 1/2 · 2/3.
    assert binary_average_precision(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1])) == \
        pytest.approx(0.5 + 1 / 3)
    assert binary_roc_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None
    assert binary_average_precision(np.array([0, 0]), np.array([0.1, 0.2])) is None


def test_report_checks_shapes():
    with pytest.raises(ValueError, match="probabilities"):
        classification_report([0, 1], None, np.ones((2, 3)) / 3, ["a", "b"])
    with pytest.raises(ValueError, match="class indices"):
        classification_report([0, 5], [0, 1], None, ["a", "b"])
    rep = classification_report([0, 1], [0, 0], None, ["a", "b"])  # without probabilities: no AUCs
    assert rep["roc_auc_macro"] is None and rep["accuracy"] == 0.5


# ---------------------------------------------------------------------------------------- calibration
def test_ece_by_hand():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right), 0.55 (right).
    proba = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.45, 0.55]])
    y = np.array([0, 0, 0, 1])
    cal = calibration(proba, y)
    # 0.9 -> bin 13 (0.8667, 0.9333]: accuracy 0.5, confidence 0.9; 0.6 -> bin 8 (0.5333, 0.6]; 0.55 -> bin 8.
    b13, b8 = cal["bins"][13], cal["bins"][8]
    assert (b13["count"], b13["accuracy"], b13["confidence"]) == (2, 0.5, pytest.approx(0.9))
    assert (b8["count"], b8["accuracy"], b8["confidence"]) == (2, 1.0, pytest.approx(0.575))
    assert cal["ece"] == pytest.approx(2 / 4 * 0.4 + 2 / 4 * 0.425)
    assert cal["mce"] == pytest.approx(0.425)
    # Brier: (0.01+0.01) + (0.81+0.81) + (0.16+0.16) + (0.2025+0.2025), over 4.
    assert cal["brier"] == pytest.approx((0.02 + 1.62 + 0.32 + 0.405) / 4)
    assert cal["brier"] == pytest.approx(skm.brier_score_loss(y, proba, labels=[0, 1], scale_by_half=False))
    assert sum(b["count"] for b in cal["bins"]) == 4 and len(cal["bins"]) == 15


def test_bin_edges_go_to_the_lower_bin_and_perfect_calibration_is_zero():
    bins = calibration_bins(np.array([0.0, 1 / 15, 2 / 15, 1.0]), np.array([1, 1, 1, 1]))
    assert [b["count"] for b in bins][:3] == [2, 1, 0] and bins[14]["count"] == 1
    # 10 predictions at confidence 0.7 of which 7 are right: calibrated.
    proba = np.tile([0.7, 0.3], (10, 1))
    y = np.array([0] * 7 + [1] * 3)
    assert calibration(proba, y)["ece"] == pytest.approx(0.0, abs=1e-12)
    # Always sure and always wrong: ECE 1, Brier 2.
    worst = calibration(np.tile([1.0, 0.0], (5, 1)), np.ones(5, int))
    assert worst["ece"] == worst["mce"] == 1.0 and worst["brier"] == 2.0


def test_multi_label_calibration_scores_each_decision():
    proba = np.array([[0.8, 0.3], [0.4, 0.9]])
    y = np.array([[1, 1], [0, 1]])
    # Decisions: 0.8 yes (right, conf 0.8), 0.3 no (wrong, conf 0.7), 0.4 no (right, 0.6), 0.9 yes (right, 0.9).
    cal = calibration(proba, y, multi_label=True)
    assert sum(b["count"] for b in cal["bins"]) == 4
    assert cal["ece"] == pytest.approx((0.2 + 0.7 + 0.4 + 0.1) / 4)
    assert brier_score(proba, y, multi_label=True) == pytest.approx((0.04 + 0.49 + 0.16 + 0.01) / 4)


def test_pictures_are_written(tmp_path):
    rng = np.random.default_rng(0)
    proba = _softmax(rng.normal(size=(50, 3)))
    y = rng.integers(0, 3, 50)
    cal = calibration(proba, y)
    reliability_png(cal["bins"], tmp_path / "rel.png", ece=cal["ece"])
    rep = classification_report(y, None, proba, ["a", "b", "c"])
    confusion_png(rep["confusion"]["matrix"], ["a", "b", "c"], tmp_path / "cm.png")
    yl = (rng.random((50, 3)) < 0.5).astype(int)
    confusion_png(multilabel_confusion(yl, (proba > 0.3).astype(int)), ["a", "b", "c"], tmp_path / "ml.png")
    for name in ("rel.png", "cm.png", "ml.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert math.isfinite(cal["ece"])
