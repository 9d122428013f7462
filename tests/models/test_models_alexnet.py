"""AlexNet-5 of GPM: shape, BN without running statistics, a training step, GPM on it; the presets."""

import pytest
import torch

from mergecl import MergeclError
from mergecl.data.types import Split
from mergecl.experiment.config import load_config
from mergecl.methods.registry import resolve_methods
from mergecl.models.factory import build_learner
from mergecl.training.gpm import GPMemory, projectable_layers
from mergecl.training.loop import TrainSettings, train_task


def test_alexnet5_is_the_gpm_network():
    torch.manual_seed(0)
    model = build_learner({"name": "alexnet5"}, [f"c{i}" for i in range(10)])
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["encoder.conv1.weight"] == (64, 3, 4, 4)
    assert shapes["encoder.conv2.weight"] == (128, 64, 3, 3)
    assert shapes["encoder.conv3.weight"] == (256, 128, 2, 2)
    assert shapes["encoder.fc1.weight"] == (2048, 1024) and shapes["encoder.fc2.weight"] == (2048, 2048)
    assert shapes["head.weight"] == (10, 2048)
    assert not any("running" in k or "conv1.bias" in k for k in shapes)  # no BN statistics, no conv bias
    assert model(torch.rand(3, 3 * 32 * 32)).shape == (3, 10)  # flat inputs are reshaped
    with pytest.raises(MergeclError, match="AlexNet5 expects"):
        model(torch.rand(2, 3, 28, 28))
    with pytest.raises(MergeclError, match="model.normalize"):
        build_learner({"name": "alexnet5", "normalize": "yes"}, ["a", "b"])


def test_one_training_step_and_a_gpm_memory_on_tiny_random_data():
    torch.manual_seed(0)
    model = build_learner({"name": "alexnet5"}, ["a", "b", "c", "d"])
    data = Split(torch.rand(8, 3, 32, 32), torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = TrainSettings(optimizer="sgd", lr=0.05, epochs=1, batch_size=8, schedule="plateau", grad_clip=None)
    stats = train_task(model, data, [0, 1], 4, settings, seed=0, val=data)
    assert stats.steps == 1
    after = model.state_dict()
    assert not torch.equal(before["encoder.conv1.weight"], after["encoder.conv1.weight"])
    assert torch.equal(before["head.weight"][2:], after["head.weight"][2:])  # other columns untouched
    layers = projectable_layers(model)
    assert list(layers) == ["encoder.conv1", "encoder.conv2", "encoder.conv3", "encoder.fc1", "encoder.fc2"]
    memory = GPMemory()
    memory.update(model, data, layers, eps=0.97, samples=8)
    widths = {name: basis.shape[0] for name, basis in memory.bases.items()}
    assert widths == {
        "encoder.conv1": 48,
        "encoder.conv2": 576,
        "encoder.conv3": 512,
        "encoder.fc1": 1024,
        "encoder.fc2": 2048,
    }
    assert all(0 < b.shape[1] <= 8 for n, b in memory.bases.items() if n.startswith("encoder.fc"))  # rank <= 8


@pytest.mark.parametrize("n", [10, 20])
def test_the_paper_presets_parse(n):
    config = load_config(f"became-cifar100-{n}")  # packaged: mergecl run became-cifar100-10
    assert (config.data.source, config.data.scenario, config.data.n_tasks) == ("cifar100", "task", n)
    assert config.model["name"] == "alexnet5"
    train = config.train
    assert (train.optimizer, train.lr, train.momentum, train.batch_size, train.schedule) == (
        "sgd",
        0.05,
        0,
        64,
        "plateau",
    )
    assert [spec.training for spec in resolve_methods(config.methods)] == ["gpm", "became", "gpm_one_over_t"]
    assert build_learner(config.model, [f"c{i}" for i in range(100)]).head.weight.shape == (100, 2048)
