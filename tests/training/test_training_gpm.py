"""GPM: projection, basis thresholds, residual criterion, caps, representations, and what it buys."""

import math

import pytest
import torch
from torch import nn

from mergecl.data.types import Split
from mergecl.models.base import Learner
from mergecl.models.heads import LinearHead
from mergecl.training.gpm import (
    GPMemory,
    GradientProjection,
    Representation,
    collect_representations,
    energy_kept,
    eps_at,
    from_matrix,
    frozen,
    layer_inputs,
    projectable_layers,
    unprojected_params,
    update_basis,
)
from mergecl.training.loop import TrainSettings, accuracy, train_task


def learner(dim=4, hidden=3, classes=4, seed=0):
    torch.manual_seed(seed)
    return Learner(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU()), LinearHead(hidden, classes))


def span_projector(basis):
    return basis @ basis.T


# --- projection ----------------------------------------------------------------------------------


def test_projection_removes_exactly_the_component_in_the_span():
    model = learner(dim=3, hidden=2)
    layer = model.encoder[0]
    layer.weight.grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, -1.0, 0.5]])
    basis = torch.tensor([[1.0], [1.0], [0.0]]) / math.sqrt(2)  # span{(e1 + e2)/sqrt 2}
    GradientProjection(model, {"encoder.0": layer}, {"encoder.0": basis}).after_backward(model)
    # by hand: row [a, b, c] -> [a - (a+b)/2, b - (a+b)/2, c]
    expected = torch.tensor([[1 - 1.5, 2 - 1.5, 3.0], [4 - 1.5, -1 - 1.5, 0.5]])
    assert torch.allclose(layer.weight.grad, expected)
    assert torch.allclose(layer.weight.grad @ basis, torch.zeros(2, 1), atol=1e-6)


def test_projection_of_a_conv_weight_uses_out_x_in_k_k():
    conv = nn.Conv2d(2, 3, 2, bias=False)
    g = torch.randn(3, 2, 2, 2)
    conv.weight.grad = g.clone()
    basis, _ = torch.linalg.qr(torch.randn(8, 3))
    model = Learner(nn.Sequential(conv), LinearHead(3, 2))
    GradientProjection(model, {"encoder.0": conv}, {"encoder.0": basis}).after_backward(model)
    flat = g.reshape(3, 8)
    assert torch.allclose(conv.weight.grad.reshape(3, 8), flat - flat @ basis @ basis.T, atol=1e-6)
    # an input patch inside span(M) gives the same output before and after a projected update
    patch = basis @ torch.randn(3)
    assert torch.allclose(conv.weight.grad.reshape(3, 8) @ patch, torch.zeros(3), atol=1e-5)


def test_conv_patches_are_what_the_weight_multiplies():
    conv = nn.Conv2d(2, 4, 3, padding=1, stride=2, bias=False)
    x = torch.randn(2, 2, 7, 7)
    rows = layer_inputs(conv, x)  # [B * L, C*kh*kw]
    out = conv(x)  # [B, 4, 4, 4]
    via_rows = (rows @ conv.weight.reshape(4, -1).T).reshape(2, -1, 4)
    assert torch.allclose(via_rows, out.flatten(2).transpose(1, 2), atol=1e-5)


def test_token_inputs_keep_only_unmasked_positions():
    linear = nn.Linear(5, 2)
    x = torch.randn(2, 3, 5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    rows = layer_inputs(linear, x, mask)
    assert rows.shape == (3, 5) and torch.equal(rows[2], x[1, 0])


# --- the basis -----------------------------------------------------------------------------------


def matrix_with_energies(energies, d=6, n=40, seed=0):
    """R = U diag(s) V^T with s^2 = energies; returns (R, U)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(energies), generator=g, dtype=torch.float64))
    s = torch.tensor(energies, dtype=torch.float64).sqrt()
    return u[:, : len(energies)] @ torch.diag(s) @ v.T, u


@pytest.mark.parametrize(("eps", "k"), [(0.5, 1), (0.8, 2), (0.81, 3), (0.95, 3), (0.96, 4), (1.0, 4)])
def test_first_task_keeps_the_smallest_k_reaching_eps(eps, k):
    r, u = matrix_with_energies([0.5, 0.3, 0.15, 0.05])
    basis = update_basis(None, from_matrix(r), eps)
    assert basis.shape == (6, k)
    assert torch.allclose(span_projector(basis.double()), span_projector(u[:, :k]), atol=1e-5)
    assert torch.allclose(basis.T @ basis, torch.eye(k), atol=1e-5)


def test_residual_criterion_adds_directions_only_when_needed():
    eye = torch.eye(4, dtype=torch.float64)
    basis = update_basis(None, from_matrix(eye[:, :2] @ torch.randn(2, 30, dtype=torch.float64)), 0.97)
    assert basis.shape[1] == 2
    # new task inside span(M): nothing to add
    inside = eye[:, :2] @ torch.randn(2, 30, dtype=torch.float64)
    assert update_basis(basis, from_matrix(inside), 0.97).shape[1] == 2
    # 1% of the energy outside, eps 0.97: already explained, nothing added
    small = torch.cat([torch.full((1, 1), 0.99).sqrt() * eye[:, :1], torch.full((1, 1), 0.01).sqrt() * eye[:, 2:3]], 1)
    assert update_basis(basis, from_matrix(small), 0.97).shape[1] == 2
    assert energy_kept(basis, from_matrix(small)) == pytest.approx(0.99)
    # 10% outside, along e3: exactly e3 is added, orthogonal to the old directions
    big = torch.cat([torch.full((1, 1), 0.9).sqrt() * eye[:, :1], torch.full((1, 1), 0.1).sqrt() * eye[:, 2:3]], 1)
    grown = update_basis(basis, from_matrix(big), 0.97)
    assert grown.shape[1] == 3 and torch.equal(grown[:, :2], basis)
    assert abs(float(grown[2, 2])) == pytest.approx(1.0, abs=1e-6)
    assert torch.allclose(grown.T @ grown, torch.eye(3), atol=1e-5)


def test_bases_are_capped_at_the_layer_width():
    d = 3
    full_rank = torch.randn(d, 50, dtype=torch.float64)
    basis = update_basis(None, from_matrix(full_rank), 1.0)
    assert basis.shape == (d, d)
    assert update_basis(basis, from_matrix(torch.randn(d, 50, dtype=torch.float64)), 1.0).shape == (d, d)
    # eps above 1 (the schedule at late tasks) never adds zero-energy directions
    rank_one = torch.ones(d, 1, dtype=torch.float64) @ torch.randn(1, 20, dtype=torch.float64)
    assert update_basis(None, from_matrix(rank_one), 1.0).shape == (d, 1)


def test_eps_schedule():
    assert eps_at(0) == pytest.approx(0.97)
    assert eps_at(4) == pytest.approx(0.982)
    assert eps_at(30) == 1.0  # capped
    assert eps_at(2, 0.9, 0.01) == pytest.approx(0.92)


# --- layers, heads, freezing, memory -------------------------------------------------------------


def test_heads_are_not_projected_and_biases_are_frozen_in_the_projected_stage():
    model = learner()
    layers = projectable_layers(model)
    assert list(layers) == ["encoder.0"]
    assert list(projectable_layers(model, project_head=True)) == ["encoder.0", "head"]
    frozen_params = unprojected_params(model, layers, project_head=False)
    assert [p is model.encoder[0].bias for p in frozen_params] == [True]
    with frozen(frozen_params):
        assert not model.encoder[0].bias.requires_grad and model.head.bias.requires_grad
    assert model.encoder[0].bias.requires_grad
    # a projected training step leaves the head's gradient untouched
    model.zero_grad()
    model(torch.randn(8, 4)).sum().backward()
    head_grad = model.head.weight.grad.clone()
    basis = torch.eye(4)[:, :2]
    GradientProjection(model, layers, {"encoder.0": basis}).after_backward(model)
    assert torch.equal(model.head.weight.grad, head_grad)
    assert torch.allclose(model.encoder[0].weight.grad[:, :2], torch.zeros(3, 2))


def test_memory_round_trips_as_carried_state():
    model = learner()
    data = Split(torch.randn(50, 4), torch.randint(0, 2, (50,)))
    memory = GPMemory()
    memory.update(model, data, projectable_layers(model), 0.9, samples=20)
    carried = memory.carried()
    assert set(carried) == {"gpm/encoder.0"} and carried["gpm/encoder.0"].dtype == torch.float32
    again = GPMemory.from_carried({**carried, "prior/x": torch.zeros(1)})
    assert set(again.bases) == {"encoder.0"} and torch.equal(again.bases["encoder.0"], memory.bases["encoder.0"])
    assert 0 < memory.fill() <= 1


def test_representations_come_from_the_sampled_examples_in_eval_mode():
    model = Learner(nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.9)), LinearHead(3, 2))
    data = Split(torch.randn(30, 4), torch.zeros(30, dtype=torch.long))
    a = collect_representations(model, data, projectable_layers(model, True), samples=2, seed=3)
    b = collect_representations(model, data, projectable_layers(model, True), samples=2, seed=3)
    assert a["head"].rows is not None and torch.equal(a["head"].rows, b["head"].rows)  # eval mode: no dropout
    assert model.training  # mode restored
    everything = collect_representations(model, data, projectable_layers(model), samples=100)["encoder.0"]
    assert everything.rows is None  # 30 rows > d = 4: only the Gram matrix is kept
    assert torch.allclose(everything.as_gram(), data.inputs.double().T @ data.inputs.double(), atol=1e-9)


@pytest.mark.parametrize("n", [3, 40])  # R kept as rows (n <= d) or folded into its Gram matrix
def test_rows_and_gram_paths_give_the_same_basis(n):
    g = torch.Generator().manual_seed(1)
    r = torch.randn(6, n, generator=g, dtype=torch.float64) * torch.tensor([3.0, 2, 1, 0.5, 0.2, 0.1]).view(6, 1)
    as_rows, as_gram = Representation(6), Representation(6)
    as_rows.add(r.T)
    for column in r.T:  # one row at a time: switches to the Gram once past d rows
        as_gram.add(column.view(1, -1))
    as_gram.gram = as_gram.as_gram()
    as_gram.rows = None
    old = update_basis(None, from_matrix(torch.eye(6, dtype=torch.float64)[:, :1] * 5), 0.97)
    for eps in (0.5, 0.9, 0.99):
        a, b = update_basis(old, as_rows, eps), update_basis(old, as_gram, eps)
        assert a.shape == b.shape
        assert torch.allclose(span_projector(a.double()), span_projector(b.double()), atol=1e-5)


# --- what GPM buys -------------------------------------------------------------------------------


def two_tasks(seed=0, n=600, dim=12):
    """Two binary tasks on the same inputs' space with different labelling rules (shared head)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.cat([torch.ones(dim // 2), torch.full((dim - dim // 2,), 0.02)])
    x1 = torch.randn(n, dim, generator=g) * scale  # task 1: its energy in half of the input space
    x2 = torch.randn(n, dim, generator=g)
    y1 = (x1[:, 0] + x1[:, 1] > 0).long()
    y2 = (x2[:, 8] - x2[:, 9] > 0).long()  # learnable in directions task 1 barely uses
    return Split(x1, y1), Split(x2, y2)


def test_gpm_preserves_the_first_task_much_better_than_plain_training():
    first, second = two_tasks()
    settings = TrainSettings(optimizer="sgd", lr=0.1, epochs=15, batch_size=32, schedule="constant", grad_clip=None)
    drops = {}
    for projected in (False, True):
        torch.manual_seed(0)
        model = Learner(nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()), LinearHead(32, 2))
        train_task(model, first, [0, 1], 2, settings, seed=0)
        before = accuracy(model, first, [0, 1])
        layers = projectable_layers(model, project_head=True)  # one head shared by both tasks
        hooks, frozen_params = [], []
        if projected:
            memory = GPMemory()
            memory.update(model, first, layers, eps=0.97, samples=125)
            hooks = [GradientProjection(model, layers, memory.bases)]
            frozen_params = unprojected_params(model, layers, project_head=True)
        with frozen(frozen_params):
            train_task(model, second, [0, 1], 2, settings, seed=1, hooks=hooks)
        assert before > 90
        drops[projected] = (before - accuracy(model, first, [0, 1]), accuracy(model, second, [0, 1]))
    plain_drop, gpm_drop = drops[False][0], drops[True][0]
    assert plain_drop > 10, drops  # about 50 points on this seed
    assert gpm_drop < 5 and gpm_drop < plain_drop / 3, drops  # about 2 points
    assert drops[True][1] > 60, drops  # the second task is still learned (in the remaining directions)
