"""MetaLR's held-out meta split never reaches a training batch (checked image by image).

Each synthetic image is one constant grey value, its id; the loader's x/127.5 − 1 keeps it exact,
so every batch the trainer trains on (or MetaLR draws as a meta batch) can be traced back to the
images it holds.
"""

from __future__ import annotations

import numpy as np
import torch
from metalr_bench.benchmark.training.cell import build_parts
from metalr_bench.benchmark.training.trainer import Trainer, TrainerSettings
from metalr_bench.datasets.core.base import DatasetBundle, Split, TaskType
from metalr_bench.strategies import TrainSettings

N_TRAIN, PER_GROUP, SIZE, BATCH = 160, 4, 16, 8


def _split(ids: np.ndarray) -> Split:
    images = torch.as_tensor(ids, dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 1, SIZE, SIZE)
    groups = ids // PER_GROUP  # several images per patient: held out (or not) together
    return Split(images=images.contiguous(), labels=torch.as_tensor(groups % 2), groups=groups)


def _bundle() -> DatasetBundle:
    return DatasetBundle(
        name="ids", task=TaskType.BINARY, class_names=["0", "1"], in_channels=1, image_size=SIZE,
        train=_split(np.arange(N_TRAIN)), val=_split(np.arange(200, 216)),
        test=_split(np.arange(232, 248)),
    )


def _ids(x: torch.Tensor) -> list[int]:
    """The id of each image of a loader batch (asserting the image is still one constant)."""
    v = ((x.float() + 1) * 127.5).round().long().flatten(1)
    assert torch.equal(v, v[:, :1].expand_as(v)), "images must reach the batch unaltered"
    return v[:, 0].tolist()


def _trainer(epochs: int) -> Trainer:
    built = build_parts(
        "smallcnn", 1, 2, "metalr", {"meta_source": "holdout"}, TrainSettings(lr=1e-2),
        bundle=_bundle(),
        trainer_settings=TrainerSettings(epochs=epochs, batch_size=BATCH, augment=False,
                                         device="cpu"),
    )
    assert built.trainer is not None
    return built.trainer


def test_metalr_holdout_meta_split_never_appears_in_a_training_batch() -> None:
    epochs = 2
    trainer = _trainer(epochs)
    assert trainer.meta_split is not None
    meta = trainer.meta_split.images[:, 0, 0, 0].tolist()
    assert len(meta) == len(set(meta)) > 0
    meta_groups = {i // PER_GROUP for i in meta}
    assert {i for i in range(N_TRAIN) if i // PER_GROUP in meta_groups} == set(meta), (
        "the meta split holds whole patients")
    rest = sorted(set(range(N_TRAIN)) - set(meta))
    assert len(rest) % BATCH == 0  # so drop_last drops nothing and each epoch sees all of `rest`

    # the loader itself, pass after pass (each pass reshuffles)
    for _ in range(3):
        seen = [i for x, _ in trainer.train_loader for i in _ids(x)]
        assert sorted(seen) == rest

    # and what fit() really trains on, including the batches MetaLR draws for its meta-steps
    trained: list[list[int]] = []
    drawn: list[int] = []
    train_step, strategy_step = trainer.train_step, trainer.strategy.train_step

    def record_train_step(x, y, **kw):
        trained.append(_ids(x))
        return train_step(x, y, **kw)

    def record_meta(ctx, batch):
        meta_batch = ctx.meta_batch

        def draw():
            xm, ym = meta_batch()
            drawn.extend(_ids(xm))
            return xm, ym

        ctx.meta_batch = draw
        return strategy_step(ctx, batch)

    trainer.train_step = record_train_step
    trainer.strategy.train_step = record_meta
    trainer.fit()

    per_epoch = len(rest) // BATCH
    assert len(trained) == epochs * per_epoch
    for e in range(epochs):
        epoch_ids = [i for b in trained[e * per_epoch:(e + 1) * per_epoch] for i in b]
        assert sorted(epoch_ids) == rest, f"epoch {e} trained on a meta image or missed one"
    assert not {i for b in trained for i in b} & set(meta)
    assert drawn and set(drawn) <= set(meta)  # meta batches come from the meta split only
    assert not {i // PER_GROUP for b in trained for i in b} & meta_groups  # no patient on both
