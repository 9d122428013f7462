import pytest
import torch

from mergecl.errors import MergeclError
from mergecl.models import build_learner
from mergecl.models.resnet_cifar import ResNetCifar, load_resnet_cifar, resnet_cifar_preparer
from mergecl.models.weights import read_state_dict

FILES = {20: "resnet20-12fca82f.th", 56: "resnet56-4bfd9763.th"}
PARAMS = {20: 269_722, 56: 853_018}  # akamaster's README: 0.27M and 0.85M


@pytest.fixture(scope="module")
def weights_dir(shared_data):
    return shared_data / "resnet_cifar10"


@pytest.mark.parametrize("depth", [20, 56])
def test_real_weights_load_strictly(weights_dir, depth):
    path = weights_dir / FILES[depth]
    model = load_resnet_cifar(path, depth, num_classes=10)  # classifier kept: every key must match
    assert sum(p.numel() for p in model.parameters()) == PARAMS[depth]
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["state_dict"] and all(k.startswith("module.") for k in raw["state_dict"])
    loaded = model.state_dict()
    for key, value in raw["state_dict"].items():
        assert torch.equal(loaded[key.removeprefix("module.")], value), key
    assert set(loaded) - {k.removeprefix("module.") for k in raw["state_dict"]} == {
        k for k in loaded if k.endswith("num_batches_tracked")
    }


def test_encoder_drops_classifier_and_gives_finite_features(weights_dir):
    encoder = load_resnet_cifar(weights_dir / FILES[20], 20).eval()
    assert encoder.linear is None and not any(k.startswith("linear.") for k in encoder.state_dict())
    torch.manual_seed(0)
    images = resnet_cifar_preparer(augment=False)(torch.rand(8, 3, 32, 32), False)
    with torch.no_grad():
        features = encoder(images)
    assert features.shape == (8, 64)
    assert torch.isfinite(features).all() and features.abs().sum() > 0


def test_factory_resnet_cifar_from_real_weights(weights_dir):
    path = weights_dir / FILES[20]
    learner = build_learner({"name": "resnet_cifar", "depth": 20, "pretrained": str(path)}, list("abcde"))
    state = read_state_dict(path)
    assert torch.equal(learner.state_dict()["encoder.conv1.weight"], state["conv1.weight"])
    assert learner.head.weight.shape == (5, 64)
    learner.eval()
    assert learner(learner.prepare(torch.rand(2, 3, 32, 32))).shape == (2, 5)


def test_wrong_depth_names_file_and_keys(weights_dir):
    with pytest.raises(MergeclError, match=r"resnet20-12fca82f\.th: weights do not match the model \(missing"):
        load_resnet_cifar(weights_dir / FILES[20], 56)


_EXECUTED = []


def _payload(message: str) -> None:
    _EXECUTED.append(message)


class _CarriesCode:
    def __reduce__(self):
        return (_payload, ("code ran",))


def test_pickle_carrying_code_is_refused(tmp_path):
    path = tmp_path / "evil.th"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "extra": _CarriesCode()}, path)
    with pytest.raises(MergeclError) as info:
        load_resnet_cifar(path, 20)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "weights_only=True" in message
    assert _EXECUTED == []


def test_not_a_state_dict_is_refused(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(MergeclError, match="list.pt: not a state dict"):
        read_state_dict(path)


def test_depth_and_preparer():
    with pytest.raises(MergeclError, match="depth"):
        ResNetCifar(21)
    prepare = resnet_cifar_preparer(augment=True)
    images = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(prepare(images, False), prepare(images, False))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(prepare(images, False), (images - mean) / std)
    torch.manual_seed(1)
    augmented = prepare(images, True)
    assert augmented.shape == (4, 3, 32, 32) and not torch.equal(augmented, prepare(images, False))
