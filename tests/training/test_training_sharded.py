"""train.shard: full (FSDP2) inside the training loop, on a real gloo process group of one process:
the loop trains a sharded copy (DTensor weights and gradients reach the hooks) and gives the learner
the weights plain training gives; what FSDP2 cannot shard is a one-line error; the older spelling
shard_optimizer still reads. The 2-process equivalence with DDP is tests/run/test_run_distributed.py."""

import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mergecl import MergeclError, distributed
from mergecl.data.types import Split
from mergecl.methods.pam import Alignment, PamOptions
from mergecl.models.base import Learner
from mergecl.models.heads import LinearHead
from mergecl.training.gpm import GradientProjection
from mergecl.training.loop import Hook, TrainSettings, train_task
from mergecl.training.regularizers import EWC


@pytest.fixture
def one_process(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def three_classes(n=230):
    """Three Gaussian blobs in 8 dimensions (230: the last batch of 50 is a short one)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(3, (n,), generator=g)
    return Split(torch.randn(3, 8, generator=g)[labels] * 3 + torch.randn(n, 8, generator=g), labels)


def learner(seed=0):
    torch.manual_seed(seed)
    return Learner(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16)), LinearHead(16, 10))


class SeesShards(Hook):
    """Records whether the trained weights and gradients the hooks get are DTensors."""

    def __init__(self):
        self.weights, self.grads = set(), set()

    def after_backward(self, learner):
        self.grads.add(type(learner.encoder[0].weight.grad).__name__)

    def after_step(self, learner, step):
        self.weights.add(type(learner.encoder[0].weight).__name__)


def trained(shard, seeing=None):
    """A learner trained with an EWC penalty, a GPM projection and PAM's alignment: every kind of hook."""
    model = learner()
    anchor = {n: p.detach().clone() + 0.1 for n, p in model.named_parameters()}
    fisher = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) for n, p in model.named_parameters()}
    basis = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(2)))[0]
    hooks = [
        EWC(anchor, fisher, lam=1.0),
        GradientProjection(model, {"encoder.0": model.encoder[0]}, {"encoder.0": basis}),
        Alignment({n: -p.detach().clone() for n, p in model.named_parameters()}, PamOptions(p=0.3, align_every=3)),
        *([seeing] if seeing else []),
    ]
    settings = TrainSettings(epochs=2, batch_size=50, lr=0.01, shard=shard)
    train_task(model, three_classes(), [0, 1, 2], 10, settings, seed=0, hooks=hooks)
    return model, hooks[2].resets


def test_a_sharded_copy_trains_the_weights_of_plain_training(one_process):
    seeing = SeesShards()
    sharded, resets = trained("full", seeing)
    assert seeing.weights == {"DTensor"} and seeing.grads == {"DTensor"}  # the hooks worked on shards
    plain, plain_resets = trained("none")
    assert resets == plain_resets > 0
    for (name, a), b in zip(sharded.state_dict().items(), plain.state_dict().values(), strict=True):
        assert type(a) is torch.Tensor and float((a - b).abs().max()) < 1e-6, name
    assert not sharded.training and all(type(p) is nn.Parameter for p in sharded.parameters())


def test_the_repeated_blocks_are_the_units_and_tied_weights_stay_in_the_root():
    model = learner()
    assert distributed.shard_units(model) == [model.encoder[0], model.encoder[2]]
    model.head.weight = model.encoder[2].weight  # tied: one unit cannot hold both
    assert distributed.shard_units(model) == [model.encoder[0]]


def test_a_model_fsdp2_cannot_shard_is_a_one_line_error(one_process):
    model = learner()
    model.temperature = nn.Parameter(torch.tensor(1.0))  # FSDP2 shards no 0-d parameter
    with pytest.raises(MergeclError) as err, distributed.sharded(model, "full"):
        pass
    message = str(err.value)
    assert message.startswith("train.shard: full: FSDP2 cannot shard this model: ") and "\n" not in message, message
    assert model.temperature.device.type == "cpu" and type(model.temperature) is nn.Parameter


def test_shard_optimizer_is_the_older_spelling_of_shard():
    assert TrainSettings(shard_optimizer=True).shard == "optimizer"
    assert TrainSettings(shard_optimizer=False).shard == "none"
    assert TrainSettings().shard == "none" and "shard_optimizer" not in TrainSettings().model_dump()
    with pytest.raises(ValueError, match="shard_optimizer is now spelled shard"):
        TrainSettings(shard_optimizer=True, shard="full")


def test_ddp_keeps_buffers_per_process_without_a_deprecation_warning(one_process):
    """DDP's broadcast_buffers is deprecated in torch 2.13; its replacement would sync the buffers
    at every wrap. The wrap keeps them per process and says nothing to the user's log."""
    module = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = distributed.wrap(module)
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    assert wrapped.broadcast_buffers is False
    assert [str(w.message) for w in caught if "buffers" in str(w.message)] == []


class Pooled(nn.Module):
    """A BERT-like encoder under mean pooling: its pooler is a parameter the forward never uses."""

    def __init__(self):
        super().__init__()
        self.body, self.pooler = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.body(x).mean(dim=1)


def test_ddp_trains_past_a_parameter_the_forward_never_uses_and_says_nothing(one_process, capfd):
    """Plain DDP waits for the unused parameter's gradient (in one process: refuses the next step);
    the wrap's static graph finds it in the first step. find_unused_parameters would also work but
    warns from every process of every task where all parameters are used (the MLP below)."""
    torch.manual_seed(0)
    model = distributed.wrap(Pooled())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
    assert model.module.pooler.weight.grad is None and model.module.body.weight.grad is not None
    mlp = distributed.wrap(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)))
    for _ in range(2):
        mlp(torch.randn(5, 4)).sum().backward()
    assert "unused" not in capfd.readouterr().err
