"""The training loop, Fisher estimation and the LwF/EWC hooks; a broken model is never trained on nor
evaluated: non-finite losses, weights and outputs stop with NonFiniteError (a one-line MergeclError)
naming what broke and when."""

import math

import pytest
import torch
from torch import nn

from mergecl import MergeclError
from mergecl.data.types import Split
from mergecl.models.base import Learner
from mergecl.models.heads import LinearHead
from mergecl.training.fisher import diagonal_fisher
from mergecl.training.loop import (
    Hook,
    NonFiniteError,
    TrainSettings,
    accuracy,
    check_finite,
    label_map,
    lr_factor,
    predict,
    train_task,
)
from mergecl.training.regularizers import EWC, LwF, online_fisher


def toy(n=400, classes=(0, 1, 2, 3), dim=8, seed=0):
    """Linearly separable blobs with global class ids ``classes``."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(10, dim, generator=g) * 4
    labels = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
    return Split(centers[labels] + torch.randn(n, dim, generator=g), labels)


def learner(dim=8, num_classes=10, seed=0):
    torch.manual_seed(seed)
    return Learner(nn.Sequential(nn.Linear(dim, 16), nn.ReLU()), LinearHead(16, num_classes))


def test_lr_schedule():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(99, 100, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert lr_factor(50, 100, 0, "constant") == 1.0
    # a task shorter than the warm-up never leaves it (the MagMax protocol with small tasks)
    assert lr_factor(4, 5, 500, "cosine") == pytest.approx(5 / 500)


def test_label_map():
    table = label_map([7, 2, 5], 10)
    assert table[7] == 0 and table[2] == 1 and table[5] == 2 and table[0] == -1


def test_training_learns_and_is_deterministic():
    data = toy()
    settings = TrainSettings(lr=0.01, epochs=5, batch_size=32)
    a, b, c = learner(), learner(), learner()
    train_task(a, data, [0, 1, 2, 3], 10, settings, seed=1)
    train_task(b, data, [0, 1, 2, 3], 10, settings, seed=1)
    train_task(c, data, [0, 1, 2, 3], 10, settings, seed=2)
    assert accuracy(a, toy(seed=0), [0, 1, 2, 3]) > 95
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values(), strict=True))


def test_class_incremental_training_touches_only_its_columns():
    model = learner()
    before = model.head.weight.detach().clone()
    train_task(model, toy(classes=(2, 3)), [2, 3], 10, TrainSettings(lr=0.01, epochs=1), seed=0)
    changed = (model.head.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [c in (2, 3) for c in range(10)]
    # predictions are global ids among the given classes only
    assert set(predict(model, toy(classes=(2, 3)), [2, 3]).tolist()) <= {2, 3}


def test_hooks_are_called_and_can_freeze_training():
    class Freeze(Hook):
        calls = 0

        def after_backward(self, learner):
            Freeze.calls += 1
            for p in learner.parameters():
                p.grad = None

    model = learner()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = train_task(model, toy(n=64), [0, 1, 2, 3], 10, TrainSettings(epochs=1, batch_size=16), 0, [Freeze()])
    assert Freeze.calls == stats.steps == 4
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fractional_epochs():
    stats = train_task(learner(), toy(n=320), [0, 1, 2, 3], 10, TrainSettings(epochs=0.5, batch_size=32), 0)
    assert stats.steps == 5 and stats.examples == 160


@pytest.mark.parametrize(("amp", "dtype"), [("bf16", torch.bfloat16), ("auto", torch.float32), ("off", torch.float32)])
def test_bf16_autocast_runs_the_forward_in_bf16_and_keeps_fp32_weights(amp, dtype):
    """amp: bf16 autocasts the forward on any device (here the CPU, as on a GPU); auto does so on
    GPUs only. Weights, gradients and the loss stay fp32 either way."""
    outputs_dtypes, grad_dtypes = set(), set()

    class Record(Hook):
        def loss(self, learner, inputs, outputs, labels):
            outputs_dtypes.add(outputs.dtype)

        def after_backward(self, learner):
            grad_dtypes.update(p.grad.dtype for p in learner.parameters())

    model = learner()
    train_task(model, toy(), [0, 1, 2, 3], 10, TrainSettings(lr=0.01, epochs=5, amp=amp), 0, [Record()])
    assert outputs_dtypes == {dtype}
    assert grad_dtypes == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert accuracy(model, toy(seed=0), [0, 1, 2, 3]) > 95


def test_diagonal_fisher_matches_the_papers_estimator():
    data = toy(n=6)
    model = learner()
    fisher = diagonal_fisher(model, data, [0, 1, 2, 3], 10, labels="true", batch_size=3)
    # by hand: per batch of 3, (grad of the mean loss)^2 * 3, summed, divided by 6
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for index in (torch.arange(0, 3), torch.arange(3, 6)):
        model.zero_grad()
        logits = model(data.inputs[index])[:, [0, 1, 2, 3]]
        nn.functional.cross_entropy(logits, label_map([0, 1, 2, 3], 10)[data.labels[index]]).backward()
        for n, p in model.named_parameters():
            expected[n] += p.grad.square() * 3
    for n in expected:
        assert torch.allclose(fisher[n], expected[n] / 6, atol=1e-7), n
    predicted = diagonal_fisher(model, data, [0, 1, 2, 3], 10)  # default: the model's own argmax labels
    assert set(predicted) == set(expected) and all((v >= 0).all() for v in predicted.values())


def test_lwf_is_zero_for_the_same_model_and_positive_after_change():
    model = learner()
    data = toy(n=32)
    hook = LwF(model, old_classes=[0, 1], lam=0.3, temperature=2.0)
    out = model(data.inputs)
    assert float(hook.loss(model, data.inputs, out, None).detach()) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.head.weight.add_(torch.randn_like(model.head.weight))
    assert float(hook.loss(model, data.inputs, model(data.inputs), None).detach()) > 0


def test_ewc_penalty_formula():
    model = learner()
    anchor = {n: p.detach().clone() for n, p in model.named_parameters()}
    fisher = {n: torch.full_like(p, 2.0) for n, p in model.named_parameters()}
    hook = EWC(anchor, fisher, lam=10.0)
    assert float(hook.penalty(model).detach()) == 0.0  # a term of the weights alone: no batch needed
    with torch.no_grad():
        model.head.bias.add_(1.0)
    # lam/2 * F * 1^2 * 10 entries = 5 * 2 * 10
    assert float(hook.penalty(model).detach()) == pytest.approx(100.0)


def test_online_fisher():
    first = {"w": torch.tensor([4.0])}
    assert online_fisher(None, first)["w"] == 4.0
    assert online_fisher(first, {"w": torch.tensor([2.0])})["w"] == 3.0


# ------------------------------------------------------------------ non-finite losses, weights, outputs


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
