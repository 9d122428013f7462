import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mergecl.errors import MergeclError
from mergecl.models import LinearHead, build_learner
from mergecl.models.small import MLP, SmallCNN

CLASSES = [f"c{i}" for i in range(5)]


def test_mlp_shapes_and_layers():
    mlp = MLP(12, [16, 8], dropout=0.2)
    assert mlp.out_dim == 8
    assert mlp(torch.randn(4, 3, 4)).shape == (4, 8)  # flattened
    assert sum(isinstance(m, nn.Dropout) for m in mlp.modules()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in MLP(12, [16]).modules()) == 0
    assert MLP(12, []).out_dim == 12  # no hidden layer: a linear model once the head is on top
    with pytest.raises(MergeclError, match="expects 12 input features"):
        mlp(torch.randn(4, 13))
    with pytest.raises(MergeclError, match="hidden"):
        MLP(12, [0])
    with pytest.raises(MergeclError, match="dropout"):
        MLP(12, [4], dropout=1.0)


@pytest.mark.parametrize(
    ("channels", "size", "batch"),
    [
        (1, 28, (3, 1, 28, 28)),
        (1, 28, (3, 784)),
        (1, 28, (3, 28, 28)),
        (3, 32, (3, 3, 32, 32)),
        (1, 8, (3, 64)),
    ],
)
def test_cnn_accepts_its_input_shapes(channels, size, batch):
    cnn = SmallCNN(in_channels=channels, image_size=size, feature_dim=20, dropout=0.1)
    assert cnn(torch.rand(batch)).shape == (3, 20)


def test_cnn_rejects_wrong_shapes():
    with pytest.raises(MergeclError, match="expects inputs of shape"):
        SmallCNN(1, 28)(torch.rand(2, 3, 32, 32))
    with pytest.raises(MergeclError, match="too small"):
        SmallCNN(1, 2, channels=[8, 8])


def test_factory_builds_small_learners():
    torch.manual_seed(0)
    mlp = build_learner({"name": "mlp", "in_dim": 64, "hidden": [32]}, CLASSES)
    assert isinstance(mlp.head, LinearHead) and mlp.head.out_features == 5
    assert mlp(mlp.prepare(torch.rand(6, 64))).shape == (6, 5)
    assert all(k.startswith(("encoder.", "head.")) for k in mlp.state_dict())

    cnn = build_learner({"name": "cnn", "in_channels": 3, "image_size": 32, "feature_dim": 16}, CLASSES)
    assert cnn(cnn.prepare(torch.rand(2, 3, 32, 32))).shape == (2, 5)


def test_factory_seeded_init_is_deterministic():
    spec = {"name": "mlp", "in_dim": 10, "hidden": [7]}
    torch.manual_seed(3)
    a = build_learner(spec, CLASSES).state_dict()
    torch.manual_seed(3)
    b = build_learner(spec, CLASSES).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_factory_pretrained_encoder_and_learner_files(tmp_path):
    spec = {"name": "mlp", "in_dim": 10, "hidden": [7]}
    source = build_learner(spec, CLASSES)
    encoder_file = tmp_path / "encoder.safetensors"
    save_file(source.encoder.state_dict(), str(encoder_file))
    learner_file = tmp_path / "learner.safetensors"
    save_file(source.state_dict(), str(learner_file))
    for path in (encoder_file, learner_file):
        loaded = build_learner({**spec, "pretrained": str(path)}, CLASSES)
        for key, value in source.encoder.state_dict().items():
            assert torch.equal(loaded.encoder.state_dict()[key], value)

    with pytest.raises(MergeclError, match="encoder.safetensors: tensor .layers.0.bias. has shape"):
        build_learner({**spec, "hidden": [9], "pretrained": str(encoder_file)}, CLASSES)
    with pytest.raises(MergeclError, match="weights file not found"):
        build_learner({**spec, "pretrained": str(tmp_path / "nope.safetensors")}, CLASSES)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MergeclError, match="bad.safetensors: not a valid safetensors file"):
        build_learner({**spec, "pretrained": str(bad)}, CLASSES)
