import os
import subprocess
import sys
from pathlib import Path

import pytest

import mergecl
from mergecl.errors import MergeclError
from mergecl.models import build_learner

CLASSES = ["a", "b"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "vgg"}, "model.name: unknown model 'vgg'"),
        ({}, "model.name: missing"),
        ({"name": "mlp", "in_dim": 4, "hiden": [3]}, "model.hiden: unknown option for mlp"),
        ({"name": "mlp", "in_dim": 4, "head": "cosine"}, "model.head: unknown head 'cosine'"),
        ({"name": "mlp", "in_dim": 4, "head": "zero_shot"}, "mlp has no text side"),
        ({"name": "mlp"}, "model.in_dim: required"),
        ({"name": "mlp", "in_dim": "4"}, "model.in_dim: expected an integer"),
        ({"name": "cnn", "channels": 32}, "model.channels: expected a list of integers"),
        ({"name": "cnn", "dropout": "high"}, "model.dropout: expected a number"),
        ({"name": "resnet_cifar", "depth": 18}, "depth must be one of"),
        ({"name": "hf_text", "max_len": 4}, "model.max_len: unknown option for hf_text"),
        ({"name": "open_clip", "arch": "ViT-B-16", "head_scale": "x"}, "model.head_scale: expected a number"),
    ],
)
def test_spec_errors_name_the_key(spec, message):
    with pytest.raises(MergeclError, match=message.replace("(", r"\(")):
        build_learner(spec, CLASSES)


def test_class_names_must_be_strings():
    with pytest.raises(MergeclError, match="class_names"):
        build_learner({"name": "mlp", "in_dim": 4}, [])


def test_importing_models_pulls_no_optional_dependency():
    # A fresh interpreter: importing every models module must not import these (lazy imports only).
    src = str(Path(mergecl.__file__).resolve().parents[1])
    code = (
        "import sys\n"
        "import mergecl.models, mergecl.models.text, mergecl.models.clip, mergecl.models.open_clip\n"
        "heavy = ['transformers', 'torchvision', 'timm', 'open_clip', 'PIL', 'peft']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
