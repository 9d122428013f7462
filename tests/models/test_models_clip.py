"""HF CLIP path on a TINY random CLIPModel (no download), and the torch/PIL image transforms."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mergecl.errors import MergeclError
from mergecl.models import ZeroShotHead, build_learner
from mergecl.models.clip import CLIP_TEMPLATES
from mergecl.models.images import (
    CLIP_MEAN,
    CLIP_STD,
    ImagePreparer,
    load_image,
    random_resized_crop,
    resize_center_crop,
)

transformers = pytest.importorskip("transformers")

CLASSES = ["cat", "dog", "sports_car"]


@pytest.fixture(scope="module")
def spec(tiny_clip):
    return {"name": "hf_clip", **tiny_clip}


@pytest.fixture()
def image_files(tmp_path):
    paths = []
    for i, size in enumerate([(40, 50), (64, 48), (32, 32)]):
        array = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8).numpy()
        path = tmp_path / f"img{i}.png"
        Image.fromarray(array).save(path)
        paths.append(str(path))
    return paths


def projected(out):
    """transformers 4 returns a tensor from get_*_features, transformers 5 an output object."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def test_head_is_the_text_tower_zero_shot_rule(spec):
    torch.manual_seed(0)
    learner = build_learner(spec, CLASSES)
    # Same seed, same model: recompute the head by hand with CLIPModel's own text features.
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(**spec["config"])).eval()
    tok = transformers.AutoTokenizer.from_pretrained(spec["tokenizer"])
    rows = []
    for name in ["cat", "dog", "sports car"]:
        batch = tok([t.format(name) for t in CLIP_TEMPLATES], padding=True, return_tensors="pt")
        with torch.no_grad():
            out = model.get_text_features(**batch)
        rows.append(F.normalize(F.normalize(projected(out), dim=-1).mean(0), dim=-1))
    assert isinstance(learner.head, ZeroShotHead) and learner.head.scale == 100.0
    torch.testing.assert_close(learner.head.weight, torch.stack(rows), atol=1e-5, rtol=1e-4)
    # encoder = vision tower + projection only; its features are unit vectors
    assert not any("text" in k for k in learner.state_dict())
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = learner.eval().features(learner.prepare(pixels))
        expected = F.normalize(projected(model.get_image_features(pixel_values=learner.prepare(pixels))), dim=-1)
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)


def test_backward_step_trains_vision_not_head(spec, image_files):
    torch.manual_seed(0)
    learner = build_learner(spec, CLASSES).train()
    head_before = learner.head.weight.clone()
    vision_before = {k: v.clone() for k, v in learner.encoder.state_dict().items()}
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.1)
    logits = learner(learner.prepare(image_files, train=True))
    assert logits.shape == (3, 3)
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    optimizer.step()
    assert torch.equal(learner.head.weight, head_before)
    changed = [k for k, v in learner.encoder.state_dict().items() if not torch.equal(v, vision_before[k])]
    assert any("vision_model.encoder.layers" in k for k in changed)
    assert "visual_projection.weight" in changed


def test_custom_templates_and_errors(spec):
    learner = build_learner({**spec, "templates": ["a {}"], "head_scale": 50}, CLASSES)
    assert learner.head.scale == 50.0
    with pytest.raises(MergeclError, match="needs a tokenizer"):
        build_learner({"name": "hf_clip", "config": spec["config"]}, CLASSES)
    with pytest.raises(MergeclError, match="needs a pretrained model"):
        build_learner({"name": "hf_clip"}, CLASSES)
    with pytest.raises(MergeclError, match="model.templates"):
        build_learner({**spec, "templates": "a photo of a {}"}, CLASSES)
    with pytest.raises(MergeclError, match="model.crop_scale"):
        build_learner({**spec, "crop_scale": [0.9, 1.5]}, CLASSES)
    # a linear head needs no text tower at all
    linear = build_learner({"name": "hf_clip", "config": spec["config"], "head": "linear"}, CLASSES)
    assert linear.head.weight.shape == (3, 16)


def test_preparer_paths_and_tensors(image_files):
    prepare = ImagePreparer(32, CLIP_MEAN, CLIP_STD, augment="resized_crop")
    from_paths = prepare(image_files, False)
    assert from_paths.shape == (3, 3, 32, 32)
    # eval: the 32x32 file passes unchanged apart from normalisation
    raw = load_image(image_files[2])
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(from_paths[2], (raw - mean) / std)
    # grey and uint8 tensors are accepted
    assert prepare(torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8), False).shape == (2, 3, 32, 32)
    torch.manual_seed(5)
    train_a = prepare(image_files, True)
    torch.manual_seed(5)
    train_b = prepare(image_files, True)
    torch.testing.assert_close(train_a, train_b)  # seeded augmentation is reproducible
    assert train_a.shape == (3, 3, 32, 32)


def test_resize_center_crop_and_random_resized_crop_geometry():
    image = torch.arange(6 * 10, dtype=torch.float32).view(1, 1, 6, 10) / 60
    assert resize_center_crop(image, 6).shape == (1, 1, 6, 6)
    torch.testing.assert_close(resize_center_crop(image, 6), image[..., :, 2:8])  # no resize, centre crop
    assert resize_center_crop(torch.rand(1, 3, 40, 64), 32).shape == (1, 3, 32, 32)
    torch.manual_seed(0)
    for _ in range(20):
        out = random_resized_crop(torch.rand(1, 3, 50, 40), 24, (0.9, 1.0))
        assert out.shape == (1, 3, 24, 24) and 0 <= out.min() and out.max() <= 1


def test_unreadable_image_names_the_file(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(MergeclError, match="broken.jpg"):
        load_image(bad)
    with pytest.raises(MergeclError, match="augment"):
        ImagePreparer(32, CLIP_MEAN, CLIP_STD, augment="flip")
