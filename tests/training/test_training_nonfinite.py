"""A broken model is never trained on nor evaluated: non-finite losses, weights and outputs stop
with NonFiniteError (a one-line MergeclError) naming what broke and when."""

import pytest
import torch
from torch import nn

from mergecl import MergeclError
from mergecl.data.types import Split
from mergecl.models.base import Learner
from mergecl.models.heads import LinearHead
from mergecl.training.loop import Hook, NonFiniteError, TrainSettings, accuracy, check_finite, train_task
from mergecl.training.regularizers import LwF


def toy(n=400, classes=(0, 1, 2, 3), dim=8, seed=0):
    """Linearly separable blobs with global class ids ``classes``."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, dim, generator=g) * 4
    labels = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    return Split(centers[labels] + torch.randn(n, dim, generator=g), labels)


def learner(dim=8, num_classes=10, seed=0):
    torch.manual_seed(seed)
    return Learner(nn.Sequential(nn.Linear(dim, 16), nn.ReLU()), LinearHead(16, num_classes))


def test_a_diverging_lr_stops_at_the_first_non_finite_loss():
    model, data = learner(), toy()
    with pytest.raises(NonFiniteError, match=r"^training loss became nan at step 2 \(lr 1e\+30; ") as caught:
        train_task(model, data, [0, 1, 2, 3], 10, TrainSettings(lr=1e30, epochs=3), seed=0)
    assert isinstance(caught.value, MergeclError) and "\n" not in str(caught.value)


def test_a_loss_term_that_overflows_is_caught_at_its_step():
    model, data = learner(), toy(classes=(0, 1))
    train_task(model, data, [0, 1], 10, TrainSettings(lr=0.01), seed=0)
    distil = LwF(model, [0, 1], lam=1e38)  # finite and accepted, but the scaled KL overflows
    with pytest.raises(NonFiniteError, match=r"^training loss became (nan|inf) at step \d+ "):
        train_task(model, toy(classes=(2, 3)), [2, 3], 10, TrainSettings(lr=0.01, epochs=3), 0, [distil])


class PoisonLastStep(Hook):
    """Writes an infinity into a weight after the last optimiser step (no loss sees it again)."""

    def __init__(self, last: int) -> None:
        self.last = last

    def after_step(self, learner, step: int) -> None:
        if step == self.last:
            with torch.no_grad():
                learner.head.weight[0, 0] = float("inf")


def test_weights_broken_after_the_last_step_are_caught_when_training_ends():
    model, data = learner(), toy(n=64)
    settings = TrainSettings(lr=0.01, epochs=1, batch_size=32)  # 2 steps
    with pytest.raises(NonFiniteError, match=r"^the weights after 2 training steps \(lr 0.01\): tensor 'head\."):
        train_task(model, data, [0, 1, 2, 3], 10, settings, 0, [PoisonLastStep(2)])


def test_a_model_with_non_finite_outputs_is_not_evaluated():
    model, data = learner(), toy(n=50)
    assert 0 <= accuracy(model, data, [0, 1, 2, 3]) <= 100
    with torch.no_grad():
        model.head.weight.mul_(3e38)  # finite weights, overflowing logits
    with pytest.raises(NonFiniteError, match=r"^the model's outputs are not finite on \d+ of 50 examples$"):
        accuracy(model, data, [0, 1, 2, 3])


def test_check_finite_names_the_tensor():
    check_finite({"a": torch.ones(3), "steps": torch.tensor([1, 2])}, "x")
    with pytest.raises(NonFiniteError, match=r"^the merged model: tensor 'b' is not finite$"):
        check_finite({"a": torch.ones(3), "b": torch.tensor([0.0, float("nan")])}, "the merged model")
