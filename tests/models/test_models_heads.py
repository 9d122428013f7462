import math

import pytest
import torch
from torch import nn

from mergecl.errors import MergeclError
from mergecl.models import Learner, LinearHead, ZeroShotHead, build_zero_shot_weights
from mergecl.models.heads import readable_class_name

# Hand-made "text encoder": fixed vectors per prompt, so the expected embeddings are computed by hand.
VECTORS = {
    "a cat": [3.0, 4.0],  # -> [0.6, 0.8]
    "the cat": [0.0, 2.0],  # -> [0.0, 1.0]
    "a dog": [2.0, 0.0],  # -> [1.0, 0.0]
    "the dog": [0.0, -5.0],  # -> [0.0, -1.0]
}
TEMPLATES = ["a {}", "the {}"]


def fake_encode(texts: list[str]) -> torch.Tensor:
    return torch.tensor([VECTORS[t] for t in texts])


def test_zero_shot_weights_match_hand_computation():
    weights = build_zero_shot_weights(fake_encode, ["cat", "dog"], TEMPLATES)
    # cat: mean([0.6, 0.8], [0, 1]) = [0.3, 0.9], / sqrt(0.9); dog: mean = [0.5, -0.5] -> [1, -1] / sqrt(2)
    cat = [0.3 / math.sqrt(0.9), 0.9 / math.sqrt(0.9)]
    dog = [1 / math.sqrt(2), -1 / math.sqrt(2)]
    torch.testing.assert_close(weights, torch.tensor([cat, dog]))


def test_zero_shot_weights_chunking_keeps_class_order():
    one_batch = build_zero_shot_weights(fake_encode, ["cat", "dog"], TEMPLATES)
    tiny_batches = build_zero_shot_weights(fake_encode, ["cat", "dog"], TEMPLATES, batch_size=3)
    torch.testing.assert_close(one_batch, tiny_batches)


def test_zero_shot_head_logits_are_100_times_cosine():
    head = ZeroShotHead(build_zero_shot_weights(fake_encode, ["cat", "dog"], TEMPLATES))
    logits = head(torch.tensor([[3.0, 4.0], [-6.0, 0.0]]))
    cos_cat = 0.6 * 0.3 / math.sqrt(0.9) + 0.8 * 0.9 / math.sqrt(0.9)  # 0.948683
    cos_dog = (0.6 - 0.8) / math.sqrt(2)
    expected = 100 * torch.tensor([[cos_cat, cos_dog], [-0.3 / math.sqrt(0.9), -1 / math.sqrt(2)]])
    torch.testing.assert_close(logits, expected)


def test_zero_shot_head_is_a_frozen_buffer():
    head = ZeroShotHead(torch.randn(3, 4))
    assert list(head.parameters()) == []
    assert set(head.state_dict()) == {"weight"}
    learner = Learner(nn.Linear(5, 4), head)
    assert "head.weight" in learner.state_dict()
    assert all(not name.startswith("head.") for name, _ in learner.named_parameters())
    learner(torch.randn(2, 5)).sum().backward()
    assert not head.weight.requires_grad and head.weight.grad is None
    # the buffer is stored normalised, whatever it was given
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(3))


def test_zero_shot_head_round_trips_through_state_dict():
    head = ZeroShotHead(torch.randn(3, 4))
    other = ZeroShotHead(torch.zeros(3, 4) + 1)
    other.load_state_dict(head.state_dict())
    torch.testing.assert_close(other.weight, head.weight)


def test_zero_shot_errors():
    with pytest.raises(MergeclError, match="no '\\{\\}'"):
        build_zero_shot_weights(fake_encode, ["cat"], ["a cat"])
    with pytest.raises(MergeclError, match="class_names is empty"):
        build_zero_shot_weights(fake_encode, [], TEMPLATES)
    with pytest.raises(MergeclError, match="templates is empty"):
        build_zero_shot_weights(fake_encode, ["cat"], [])
    with pytest.raises(MergeclError, match="num_classes, dim"):
        ZeroShotHead(torch.randn(4))


def test_linear_head():
    head = LinearHead(8, 5)
    assert head(torch.randn(3, 8)).shape == (3, 5)
    assert set(head.state_dict()) == {"weight", "bias"}
    with pytest.raises(MergeclError):
        LinearHead(0, 5)


def test_readable_class_name():
    assert readable_class_name("aquarium_fish") == "aquarium fish"
    assert readable_class_name("book_flight") == "book flight"
    assert readable_class_name("cat") == "cat"
