"""docs/extending.md '## A backbone': the snippet registers a backbone and runs on it, as a user would."""

from __future__ import annotations

from pathlib import Path

from docs_snippets import run_section

CHECK = r"""
import json
import math
from mergecl.models import BACKBONES, describe_backbones

assert BACKBONES["tiny"].options is TinyOptions and BACKBONES["tiny"].build is build_tiny
assert type(learner.encoder) is TinyEncoder and learner.encoder.out_dim == 16
assert "tiny: a one-layer encoder" in describe_backbones()

# the run used the new backbone (its theta_0 holds TinyEncoder's keys), and learned something
assert config.model == {"name": "tiny", "width": 48}
from safetensors import safe_open
with safe_open(str(out / "seed0" / "base.safetensors"), "pt") as base:
    assert base.get_tensor("encoder.proj.weight").shape == (48, 64) and "encoder.norm.weight" in base.keys()
on_disk = json.loads((out / "results.json").read_text())["methods"]
assert set(on_disk) == {"seq_ft", "magmax"}
for name, entry in on_disk.items():
    final_row = entry["accuracy_matrix"][-1]
    assert len(final_row) == 3 and all(math.isfinite(a) and 0 <= a <= 100 for a in final_row), (name, final_row)
    assert math.isfinite(entry["final_acc"]) and entry["final_acc"] > 10, (name, entry["final_acc"])  # 10: chance
assert on_disk["seq_ft"]["accuracy_matrix"][-1][-1] > 50  # the task just learned is learned

# the declaration's LoRA targets and the schema's types and ranges hold
lora = build_learner({"name": "tiny", "lora": {"rank": 2}}, ["a", "b"])
trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
assert trainable == {"encoder.proj.lora_A.default.weight", "encoder.proj.lora_B.default.weight", "head.weight",
                     "head.bias"}, trainable
bad = [({"width": 0}, "model.width: Input should be greater than or equal to 1, got 0"),
       ({"width": "8"}, "model.width: Input should be a valid integer, got '8'"),
       ({"widht": 8}, "model: unknown key 'widht' (options of tiny: in_dim, width; of every backbone: head,"),
       ({"head": "zero_shot"}, "model.head: tiny has no text side for a zero_shot head; use head: linear")]
for options, message in bad:
    try:
        parse_config({"model": {"name": "tiny", **options}}, "run.yaml")
    except MergeclError as err:
        assert str(err).startswith("run.yaml: " + message), str(err)
    else:
        raise AssertionError(f"{options} was accepted")
print("checked")
"""


def test_a_new_backbone_builds_runs_and_its_options_are_typed(tmp_path: Path) -> None:
    out = run_section("extending.md", "A backbone", CHECK, tmp_path, timeout=240)
    assert out.rstrip().endswith("checked")
    assert "torch.Size([2, 10])" in out
    assert "config: model.width: Input should be greater than or equal to 1, got 0" in out
    assert (tmp_path / "runs" / "tiny-digits" / "results.json").is_file()
