"""Metrics against scikit-learn on fixed inputs, per task type (MedMNIST definitions)."""

from __future__ import annotations

import numpy as np
import pytest
from metalr_bench.benchmark.training.metrics import compute_metrics
from metalr_bench.datasets.core.base import TaskType
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

rng = np.random.default_rng(0)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_binary() -> None:
    y = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    s = _softmax(rng.normal(size=(8, 2)))
    m = compute_metrics(TaskType.BINARY, y, s)
    pred = (s[:, 1] > 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s[:, 1]))
    assert m["acc"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro"))


@pytest.mark.parametrize("task", [TaskType.MULTICLASS, TaskType.ORDINAL])
def test_multiclass(task: TaskType) -> None:
    y = np.array([0, 1, 2, 3, 0, 1, 2, 3, 1, 2, 0, 3])
    s = _softmax(rng.normal(size=(12, 4)))
    m = compute_metrics(task, y, s)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s, multi_class="ovr", average="macro"))
    assert m["acc"] == pytest.approx(accuracy_score(y, s.argmax(1)))
    assert m["balanced_acc"] == pytest.approx(balanced_accuracy_score(y, s.argmax(1)))
    assert m["f1"] == pytest.approx(f1_score(y, s.argmax(1), average="macro"))


def test_multilabel() -> None:
    y = np.array([[1, 0, 1], [0, 1, 1], [1, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0]])
    s = 1 / (1 + np.exp(-rng.normal(size=(6, 3))))
    m = compute_metrics(TaskType.MULTILABEL, y, s)
    pred = (s > 0.5).astype(int)
    assert m["auc"] == pytest.approx(roc_auc_score(y, s, average="macro"))
    assert m["acc"] == pytest.approx(np.mean([accuracy_score(y[:, j], pred[:, j])
                                              for j in range(3)]))
    assert m["f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0))


def test_auc_is_nan_not_half_when_one_class_only() -> None:
    m = compute_metrics(TaskType.BINARY, np.zeros(4, int), _softmax(rng.normal(size=(4, 2))))
    assert np.isnan(m["auc"])


def _auc_by_pairs(pos: list[float], neg: list[float]) -> float:
    """AUC by hand: the share of (positive, negative) pairs ranked right, ties counting half."""
    return float(np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg]))


def test_multilabel_balanced_accuracy_is_the_mean_of_per_label_balanced_accuracies() -> None:
    """Definition used: for each label column, binary balanced accuracy (TPR + TNR) / 2 at the
    0.5 threshold; then the unweighted mean over labels (not a pooled/flattened figure)."""
    y = np.array([
        [1, 0, 0], [1, 0, 1], [1, 1, 0], [0, 0, 0],
        [0, 0, 1], [0, 1, 1], [0, 0, 0], [0, 0, 1],
    ])
    pred = np.array([
        [1, 0, 0], [1, 1, 1], [0, 1, 0], [0, 0, 0],
        [0, 1, 1], [0, 0, 0], [0, 0, 0], [1, 0, 0],
    ])
    s = np.where(pred == 1, 0.8, 0.2)  # sigmoid scores on either side of 0.5
    m = compute_metrics(TaskType.MULTILABEL, y, s)
    # label 0: TP 2 of 3 positives, TN 4 of 5 negatives
    # label 1: TP 1 of 2 positives, TN 4 of 6 negatives
    # label 2: TP 2 of 4 positives, TN 4 of 4 negatives
    per_label = [(2 / 3 + 4 / 5) / 2, (1 / 2 + 4 / 6) / 2, (2 / 4 + 4 / 4) / 2]
    assert m["balanced_acc"] == pytest.approx(np.mean(per_label))
    assert m["balanced_acc"] == pytest.approx(np.mean(
        [balanced_accuracy_score(y[:, j], pred[:, j]) for j in range(3)]))
    # the other readings give other numbers here, so the test tells them apart
    pooled = (5 / 9 + 12 / 15) / 2  # all 24 label decisions as one binary problem
    assert m["balanced_acc"] != pytest.approx(pooled)
    assert m["balanced_acc"] != pytest.approx(m["acc"])  # mean per-label plain accuracy: 17/24
    assert m["acc"] == pytest.approx(17 / 24)  # 6 + 5 + 6 right of 24


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_with_a_class_absent_from_the_test_set() -> None:
    """Class 2 never occurs in y_true (but is predicted once). Its one-vs-rest AUC is undefined:
    NaN, left out of the mean (not 0.5, not a NaN for the whole metric); balanced accuracy
    follows scikit-learn: the mean recall over the classes present in y_true."""
    y = np.array([0, 1, 3, 0, 1, 3, 0, 3, 1, 0])
    s = np.array([
        [0.70, 0.10, 0.10, 0.10],  # 0 -> 0
        [0.20, 0.50, 0.20, 0.10],  # 1 -> 1
        [0.10, 0.30, 0.20, 0.40],  # 3 -> 3
        [0.30, 0.40, 0.20, 0.10],  # 0 -> 1
        [0.10, 0.30, 0.10, 0.50],  # 1 -> 3
        [0.10, 0.10, 0.50, 0.30],  # 3 -> 2 (a class absent from y_true)
        [0.40, 0.20, 0.10, 0.30],  # 0 -> 0
        [0.20, 0.10, 0.10, 0.60],  # 3 -> 3
        [0.25, 0.35, 0.05, 0.35],  # 1 -> 1 (argmax takes the first of a tie)
        [0.45, 0.05, 0.15, 0.35],  # 0 -> 0
    ])
    assert s.argmax(1).tolist() == [0, 1, 3, 1, 3, 2, 0, 3, 1, 0]
    m = compute_metrics(TaskType.MULTICLASS, y, s)

    def ovr(c: int) -> float:
        return _auc_by_pairs(s[y == c, c].tolist(), s[y != c, c].tolist())

    aucs = [ovr(0), ovr(1), ovr(3)]  # class 2: no positive, so no AUC
    assert aucs == pytest.approx([1.0, 18.5 / 21, 16.5 / 21])  # 21 pairs each
    assert m["auc"] == pytest.approx(np.mean(aucs))
    assert m["auc"] == pytest.approx(np.mean(
        [roc_auc_score(y == c, s[:, c]) for c in (0, 1, 3)]))
    # recalls: class 0 3/4, class 1 2/3, class 3 2/3; class 2 has no support and is left out
    assert m["balanced_acc"] == pytest.approx((3 / 4 + 2 / 3 + 2 / 3) / 3)
    assert m["acc"] == pytest.approx(7 / 10)
