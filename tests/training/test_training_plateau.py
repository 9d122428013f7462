"""The plateau schedule of the GPM/BECAME releases: decay, early stop, best-epoch weights."""

import torch
from torch import nn

import mergecl.training.loop as loop
from mergecl.data.types import Split
from mergecl.models.base import Learner
from mergecl.models.heads import LinearHead
from mergecl.training.loop import Hook, Plateau, TrainSettings, lr_factor, train_task


def test_plateau_decays_after_patience_and_stops_below_the_floor():
    model = Learner(nn.Linear(2, 2), LinearHead(2, 2))
    plateau = Plateau(TrainSettings(plateau_patience=2, plateau_factor=2.0, plateau_min_factor=0.2))
    assert not plateau.end_epoch(model, 1.0)  # best
    assert not plateau.end_epoch(model, 0.9) and plateau.scale == 1.0  # new best, patience reset
    assert not plateau.end_epoch(model, 0.95) and plateau.scale == 1.0
    assert not plateau.end_epoch(model, 0.95) and plateau.scale == 0.5  # 2 epochs without progress
    assert not plateau.end_epoch(model, 0.91) and not plateau.end_epoch(model, 0.92) and plateau.scale == 0.25
    assert plateau.end_epoch(model, 0.93) is False and plateau.end_epoch(model, 0.94) is True  # 0.125 < 0.2
    assert lr_factor(100, 10, 0, "plateau") == 1.0  # no per-step decay under the plateau schedule


class Snapshot(Hook):
    def __init__(self, at):
        self.at, self.state = at, None

    def after_step(self, learner, step):
        if step == self.at:
            self.state = {k: v.clone() for k, v in learner.state_dict().items()}


def test_training_stops_early_and_keeps_the_best_epoch(monkeypatch):
    losses = iter([1.0, 2.0, 3.0, 4.0, 5.0])  # the first epoch stays the best
    monkeypatch.setattr(loop, "mean_loss", lambda *args: next(losses))
    torch.manual_seed(0)
    model = Learner(nn.Linear(4, 4), LinearHead(4, 2))
    data = Split(torch.randn(40, 4), torch.randint(0, 2, (40,)))
    settings = TrainSettings(
        optimizer="sgd",
        lr=0.5,
        epochs=50,
        batch_size=10,
        schedule="plateau",
        plateau_patience=1,
        plateau_factor=2.0,
        plateau_min_factor=0.3,
    )
    first_epoch = Snapshot(at=4)
    stats = train_task(model, data, [0, 1], 2, settings, seed=0, hooks=[first_epoch], val=data)
    assert stats.steps == 3 * 4  # epoch 2: lr / 2; epoch 3: lr / 4 < 0.3 lr -> stop
    assert all(torch.equal(v, first_epoch.state[k]) for k, v in model.state_dict().items())
