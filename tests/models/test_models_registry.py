"""Backbones declare themselves (models/registry.py): the config check reads the declarations."""

import re

import pytest
import torch
from pydantic import Field
from torch import nn

from mergecl.errors import MergeclError
from mergecl.experiment.config import load_config, packaged_configs, parse_config
from mergecl.models import BACKBONES, Backbone, ModelSpec, build_learner, describe_backbones, register_backbone
from mergecl.models.lora import LoraOptions, lora_options
from mergecl.models.registry import check_model_spec
from mergecl.options import Options

BUILT: list[str] = []  # what the probe backbone's builder was asked to build


class ProbeOptions(Options):
    width: int = Field(8, ge=1, description="feature width")
    scale: float = Field(1.0, gt=0)


class Probe(nn.Module):
    def __init__(self, width: int, scale: float) -> None:
        super().__init__()
        self.fc = nn.Linear(4, width)
        self.scale = scale
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.scale


def build_probe(spec: ModelSpec, class_names: list[str], device: torch.device) -> nn.Module:
    BUILT.append(spec.name)
    return Probe(spec.options.width, spec.options.scale)


@pytest.fixture
def probe():
    """A backbone registered by test code, as a plugin would; removed afterwards."""
    BUILT.clear()
    register_backbone("probe", summary="a test backbone", options=ProbeOptions, lora_targets=["fc"])(build_probe)
    yield BACKBONES["probe"]
    BACKBONES.pop("probe", None)


def run_config(model: dict) -> dict:
    return {"data": {"source": "digits", "n_tasks": 2}, "model": model, "methods": ["seq_ft", "magmax"]}


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"name": "probe", "hiden": 3}, "model: unknown key 'hiden' (options of probe: width, scale; of every"),
        ({"name": "probe", "width": [3]}, "model.width: Input should be a valid integer, got [3]"),
        ({"name": "probe", "width": True}, "model.width: Input should be a valid integer, got True"),
        ({"name": "probe", "width": 0}, "model.width: Input should be greater than or equal to 1, got 0"),
        ({"name": "probe", "scale": -1.0}, "model.scale: Input should be greater than 0, got -1.0"),
        ({"name": "probe", "scale": "1e3"}, "model.scale: Input should be a valid number, got '1e3'"),
        ({"name": "foo"}, "model.name: unknown backbone 'foo' (choose from mlp, cnn, alexnet5, resnet_cifar, hf_text"),
        ({"name": "probe", "head": "zero_shot"}, "model.head: probe has no text side for a zero_shot head"),
        ({"name": "probe", "head_scale": 0}, "model.head_scale: Input should be greater than 0, got 0"),
        ({"name": "probe", "templates": []}, "model.templates: List should have at least 1 item"),
        ({"name": "probe", "lora": {"rank": 0}}, "model.lora.rank: Input should be greater than or equal to 1, got 0"),
        ({"name": "probe", "lora": {"dropout": 1.0}}, "model.lora.dropout: Input should be less than 1, got 1.0"),
        ({"name": "probe", "lora": {"ranks": 2}}, "model.lora.ranks: unknown key (options of lora: rank, alpha,"),
        ({"name": "probe", "lora": 4}, "model.lora: expected a mapping of options, got 4"),
    ],
)
def test_config_errors_name_the_key_before_any_model_is_built(probe, model, message):
    with pytest.raises(MergeclError, match=re.escape(f"config: {message}")) as info:
        parse_config(run_config(model))
    assert "\n" not in str(info.value)
    assert BUILT == []  # checked when the config is read: nothing was built


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"name": "mlp", "in_dim": 64, "hidden": 3}, "model.hidden: Input should be a valid list, got 3"),
        ({"name": "mlp", "in_dim": 64, "hidden": [8, -1]}, "model.hidden[1]: Input should be greater than or equal"),
        ({"name": "mlp"}, "model.in_dim: required for mlp (the flattened input size)"),
        (
            {"name": "mlp", "in_dim": 64, "hiden": [3]},
            "model: unknown key 'hiden' (options of mlp: in_dim, hidden, dropout",
        ),
        ({"name": "mlp", "in_dim": 64, "lora": {"rank": 2}}, "model.lora.target_modules: required for mlp"),
        ({"name": "mlp", "in_dim": 64, "head": "zero_shot"}, "model.head: mlp has no text side"),
        ({"name": "cnn", "channels": []}, "model.channels: List should have at least 1 item"),
        ({"name": "resnet_cifar", "depth": 18}, "model.depth: Input should be 20, 32, 44, 56 or 110, got 18"),
        ({"name": "hf_text", "max_length": 1}, "model.max_length: Input should be greater than or equal to 2"),
        ({"name": "hf_text", "templates": ["no slot"]}, "model.templates: template 'no slot' has no '{}'"),
        ({"name": "hf_clip", "crop_scale": [0.9, 1.5]}, "model.crop_scale: expected [low, high] with 0 < low"),
        ({"name": "hf_clip"}, "model.pretrained: hf_clip needs a pretrained model (or a config to build one)"),
        ({"name": "hf_clip", "config": {}}, "model.tokenizer: a zero_shot head needs a tokenizer"),
        ({"name": "open_clip", "crop_scale": [0.9]}, "model.crop_scale: List should have at least 2 items"),
    ],
)
def test_builtin_backbones_are_checked_from_their_declarations(model, message):
    with pytest.raises(MergeclError, match=re.escape(f"config: {message}")) as info:
        parse_config(run_config(model))
    assert "\n" not in str(info.value)


def test_every_packaged_config_loads():
    configs = packaged_configs()
    assert len(configs) > 5
    for path in configs.values():
        config = load_config(path)
        assert check_model_spec(config.model).name == config.model["name"]


def test_spec_defaults_come_from_the_declarations():
    text = check_model_spec({"name": "hf_text"})
    assert (
        text.head == "zero_shot" and text.options.max_length == 128 and text.templates == BACKBONES["hf_text"].templates
    )
    assert text.pretrained is None and text.lora is None and text.head_scale == 100.0
    clip = check_model_spec({"name": "open_clip"})
    assert clip.pretrained == "openai" and clip.head == "zero_shot"
    assert check_model_spec({"name": "open_clip", "pretrained": None}).pretrained is None  # null: untrained
    lora = check_model_spec({"name": "hf_clip", "pretrained": "x", "lora": {"rank": 4}}).lora
    assert lora == LoraOptions(rank=4, alpha=4, target_modules=["q_proj", "v_proj"])
    mlp = check_model_spec({"name": "mlp", "in_dim": 3, "lora": {"target_modules": "layers\\.0", "alpha": 2}})
    assert mlp.head == "linear" and mlp.options.hidden == [256, 256] and mlp.lora.target_modules == "layers\\.0"
    assert lora_options({"rank": 2}, "x", ("a",)).target_modules == ["a"]


def test_a_registered_backbone_builds_trains_and_takes_lora(probe):
    assert isinstance(probe, Backbone) and probe.options is ProbeOptions and probe.build is build_probe
    config = parse_config(run_config({"name": "probe", "width": 6, "lora": {"rank": 2}}))
    learner = build_learner(config.model, ["a", "b", "c"])
    assert BUILT == ["probe"] and isinstance(learner.encoder, Probe) and learner.encoder.out_dim == 6
    assert learner(torch.zeros(5, 4)).shape == (5, 3)
    trainable = {n for n, p in learner.named_parameters() if p.requires_grad}
    assert trainable == {
        "encoder.fc.lora_A.default.weight",
        "encoder.fc.lora_B.default.weight",
        "head.weight",
        "head.bias",
    }
    assert "probe" in describe_backbones() and "width (int, default 8): feature width" in describe_backbones()


def test_registration_rules(probe):
    register_backbone("probe", options=ProbeOptions)(build_probe)  # the same module again: a re-run, fine
    with pytest.raises(MergeclError, match="'probe' is already registered by"):
        register_backbone(Backbone("probe", "another", build=lambda spec, names, device: nn.Identity()))

    class Clash(Options):
        head: int = 1

    with pytest.raises(MergeclError, match=r"options \['head'\] are keys every backbone takes"):
        register_backbone("clash", options=Clash)(build_probe)
    with pytest.raises(MergeclError, match="name 'a b' must be"):
        register_backbone("a b")(build_probe)
    with pytest.raises(MergeclError, match="a text side needs default prompt templates"):
        register_backbone("texty", text_side=True)(build_probe)
    assert "clash" not in BACKBONES and "texty" not in BACKBONES


def test_builder_results_are_checked(probe):
    BACKBONES["bad"] = Backbone("bad", "returns no module", build=lambda spec, names, device: "nope")
    BACKBONES["flat"] = Backbone("flat", "no out_dim", build=lambda spec, names, device: nn.Identity())
    try:
        with pytest.raises(MergeclError, match="backbone bad: its builder must return an nn.Module or a Built"):
            build_learner({"name": "bad"}, ["a"])
        with pytest.raises(MergeclError, match="backbone flat: its encoder needs an out_dim"):
            build_learner({"name": "flat"}, ["a"])
    finally:
        BACKBONES.pop("bad")
        BACKBONES.pop("flat")


def test_a_plugin_module_registers_a_backbone(tmp_path):
    from mergecl.plugins import load_plugins

    plugin = tmp_path / "my_backbone_plugin.py"
    plugin.write_text(
        "from pydantic import Field\n"
        "from torch import nn\n"
        "from mergecl.models import register_backbone\n"
        "from mergecl.options import Options\n\n"
        "class WideOptions(Options):\n"
        "    width: int = Field(4, ge=1)\n\n"
        "@register_backbone('plugged', summary='from a plugin', options=WideOptions)\n"
        "def build(spec, class_names, device):\n"
        "    encoder = nn.Linear(3, spec.options.width)\n"
        "    encoder.out_dim = spec.options.width\n"
        "    return encoder\n"
    )
    try:
        load_plugins([str(plugin)])
        with pytest.raises(MergeclError, match=re.escape("config: model.width: Input should be greater than or")):
            parse_config(run_config({"name": "plugged", "width": 0}))
        learner = build_learner(parse_config(run_config({"name": "plugged", "width": 5})).model, ["a", "b"])
        assert learner(torch.zeros(2, 3)).shape == (2, 2) and learner.encoder.out_features == 5
    finally:
        BACKBONES.pop("plugged", None)
