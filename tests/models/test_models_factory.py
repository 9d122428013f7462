import os
import re
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
        ({"name": "vgg"}, "model.name: unknown backbone 'vgg' (choose from mlp, cnn,"),
        ({}, "model.name: missing"),
        ({"name": "mlp", "in_dim": 4, "hiden": [3]}, "model: unknown key 'hiden' (options of mlp: in_dim, hidden,"),
        ({"name": "mlp", "in_dim": 4, "head": "cosine"}, "model.head: Input should be 'linear' or 'zero_shot'"),
        ({"name": "mlp", "in_dim": 4, "head": "zero_shot"}, "mlp has no text side"),
        ({"name": "mlp"}, "model.in_dim: required for mlp"),
        ({"name": "mlp", "in_dim": "4"}, "model.in_dim: Input should be a valid integer, got '4'"),
        ({"name": "cnn", "channels": 32}, "model.channels: Input should be a valid list, got 32"),
        ({"name": "cnn", "dropout": "high"}, "model.dropout: Input should be a valid number"),
        ({"name": "resnet_cifar", "depth": 18}, "model.depth: Input should be 20, 32, 44, 56 or 110, got 18"),
        ({"name": "hf_text", "max_len": 4}, "model: unknown key 'max_len' (options of hf_text: max_length,"),
        (
            {"name": "open_clip", "arch": "ViT-B-16", "head_scale": "x"},
            "model.head_scale: Input should be a valid number",
        ),
    ],
)
def test_spec_errors_name_the_key(spec, message):
    with pytest.raises(MergeclError, match=re.escape(message)):
        build_learner(spec, CLASSES)


def test_class_names_must_be_strings():
    with pytest.raises(MergeclError, match="class_names"):
        build_learner({"name": "mlp", "in_dim": 4}, [])


def test_importing_models_pulls_no_optional_dependency():
    # A fresh interpreter: importing every models module (which registers every backbone) and checking
    # a spec must not import these (lazy imports only: only a builder imports its library).
    src = str(Path(mergecl.__file__).resolve().parents[1])
    code = (
        "import sys\n"
        "import mergecl.models, mergecl.models.text, mergecl.models.clip, mergecl.models.open_clip\n"
        "from mergecl.models.registry import BACKBONES, check_model_spec\n"
        "assert 'open_clip' in BACKBONES  # declared without importing open_clip\n"
        "check_model_spec({'name': 'open_clip', 'arch': 'ViT-B-32', 'lora': {'target_modules': ['x']}})\n"
        "heavy = ['transformers', 'torchvision', 'timm', 'open_clip', 'PIL', 'peft']\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
