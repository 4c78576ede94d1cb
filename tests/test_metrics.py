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
