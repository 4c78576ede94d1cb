"""MedMNIST v2's recipe in the trainer: multi-step lr decay, and the last epoch's test metrics.

The decay is checked against torch's own ``MultiStepLR`` stepped once per epoch (what MedMNIST's
``train_and_eval_pytorch.py`` does); the last epoch's test metrics against a second run that
selects the last epoch on purpose (same seed, same weights, so its ``test`` is that figure).
"""

from __future__ import annotations

import pytest
import torch
from metalr_bench.benchmark.config import BenchmarkConfig, Cell
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import Trainer, TrainerSettings, seed_everything
from metalr_bench.datasets.synthetic import load_synthetic
from metalr_bench.strategies import TrainSettings


def _trainer(epochs: int, **settings) -> Trainer:
    seed_everything(0)
    bundle = load_synthetic(root=None, size=16, seed=0, download=False,
                            allow_md5_mismatch=False, n_patients=40)
    built = build_parts(
        "smallcnn", bundle.in_channels, bundle.num_outputs, "full", None,
        TrainSettings(lr=0.1, optimizer="sgd", epochs=epochs), bundle=bundle,
        trainer_settings=TrainerSettings(epochs=epochs, batch_size=16, augment=False, device="cpu",
                                         **settings),
    )
    assert built.trainer is not None
    return built.trainer


class _Rates:
    def __init__(self, trainer: Trainer) -> None:
        self.trainer, self.rates = trainer, []

    def on_epoch_end(self, epoch, metrics) -> None:
        self.rates.append(self.trainer.optimizer.param_groups[0]["lr"])

    def on_log_step(self, step, values) -> None: ...

    def on_step_values(self, step, values) -> None: ...


def test_multistep_decay_matches_torch_multisteplr() -> None:
    trainer = _trainer(5, lr_milestones=(2, 4), lr_gamma=0.1)
    rates = _Rates(trainer)
    trainer.callbacks.append(rates)
    trainer.fit()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    expected = []
    for _ in range(5):
        expected.append(opt.param_groups[0]["lr"])  # the rate this epoch trained with
        opt.step()
        sched.step()
    assert rates.rates == pytest.approx(expected)  # 0.1, 0.1, 0.01, 0.01, 0.001
    assert expected == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_no_milestones_leaves_the_rate_alone() -> None:
    trainer = _trainer(3)
    rates = _Rates(trainer)
    trainer.callbacks.append(rates)
    trainer.fit()
    assert rates.rates == [0.1, 0.1, 0.1]


def test_last_epoch_test_metrics_are_the_last_epochs_model(monkeypatch) -> None:
    # run 1 keeps epoch 0 (the first "best" is never beaten); run 2 keeps every epoch, so the
    # last: its selected-checkpoint test figures are run 1's last-epoch figures
    monkeypatch.setattr(Trainer, "_better", lambda self, val, best: best is None)
    first = _trainer(3).fit()
    monkeypatch.setattr(Trainer, "_better", lambda self, val, best: True)
    last = _trainer(3).fit()
    assert first.best_epoch == 0 and last.best_epoch == 2
    assert first.last_test == pytest.approx(last.test)
    assert first.last_test != first.test
    summary = first.summary()
    assert summary["last_test_auc"] == pytest.approx(last.test["auc"])
    assert summary["test_auc"] == pytest.approx(first.test["auc"])


def test_schedule_config_checks_and_identity() -> None:
    with pytest.raises(ValueError, match=r"lr_milestones=\[75, 50\]: expected increasing"):
        BenchmarkConfig(epochs=100, lr_milestones=[75, 50])
    with pytest.raises(ValueError, match="not before the last epoch"):
        BenchmarkConfig(epochs=10, lr_milestones=[5, 10])
    plain = BenchmarkConfig(epochs=100)
    decayed = BenchmarkConfig(epochs=100, lr_milestones=[50, 75])
    cell = plain.cells()[0]
    assert "lr_milestones" not in plain.cell_identity(cell)  # earlier cells keep their hash
    assert plain.config_hash(cell) != decayed.config_hash(Cell(**cell.__dict__))
    assert decayed.cell_params(cell)["lr_milestones"] == [50, 75]
