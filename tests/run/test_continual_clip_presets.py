"""The CLIP continual-merging presets (continual-clip-vit-*): valid, and each one built and run for one
short stream on tiny random CLIPs of its architecture's layout, with fine-tuned checkpoints saved
as FusionBench's are (CLIPVisionModel.save_pretrained) and a tiny image folder per task."""

import sys
import types

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mergecl.data.registry import get_source
from mergecl.data.scenarios import build_scenario
from mergecl.data.sources.vision import SUITES
from mergecl.errors import MergeclError
from mergecl.experiment.config import load_config, packaged_configs, parse_config
from mergecl.experiment.runner import run
from mergecl.methods.finetuned import FinetunedOptions, finetuned_step, learner_entries
from mergecl.methods.registry import cl_rules, resolve_method
from mergecl.options import read_options

transformers = pytest.importorskip("transformers")

ARCHS = {
    "b32": ("clip-vit-base-patch32", 32),
    "b16": ("clip-vit-base-patch16", 16),
    "l14": ("clip-vit-large-patch14", 14),
}
PRESETS = [f"continual-clip-vit-{arch}-{n}" for arch in ARCHS for n in SUITES]
RULES = ["opcm", "dop", "continual_ties", "magmax", "average", "task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts"]


def test_every_preset_is_there_and_follows_the_protocol():
    assert {n for n in packaged_configs() if n.startswith("continual-clip-")} == set(PRESETS)
    for name in PRESETS:
        arch, n = name.split("-")[-2:]
        stem = ARCHS[arch][0]
        config = load_config(name)
        tasks = config.data.options["tasks"]
        assert tasks == list(SUITES[int(n)]) and config.data.orders == 10 and config.seeds == [0]
        assert config.data.source == "vision_tasks" and config.data.scenario == "task"
        assert config.model["pretrained"] == f"openai/{stem}" and config.model["head"] == "zero_shot"
        checkpoints = config.method_options["finetuned"]["checkpoints"]
        assert checkpoints == {t: f"tanganke/{stem}_{t}" for t in tasks}
        assert {f"finetuned+{r}" for r in RULES} <= set(config.methods)
        assert all(r in cl_rules() for r in RULES)


def test_finetuned_composes_with_every_rule():
    assert resolve_method("finetuned+opcm").training == "finetuned"
    assert resolve_method("finetuned").rule is None
    with pytest.raises(MergeclError, match="finetuned\\+RULE"):
        resolve_method("finetuned+nothing")


def test_checkpoint_keys_map_onto_the_learner():
    shapes = {
        "encoder.vision_model.a.weight": (2, 3),
        "encoder.visual_projection.weight": (4, 2),
        "head.weight": (5, 4),
    }
    state = {
        "vision_model.a.weight": torch.ones(2, 3),  # a CLIPVisionModel's key
        "text_model.b.weight": torch.ones(7),  # a full CLIPModel's text side: skipped
        "logit_scale": torch.ones(()),
        "vision_model.embeddings.position_ids": torch.arange(3),  # a buffer old checkpoints carry
    }
    assert set(learner_entries(state, shapes, "ck")) == {"encoder.vision_model.a.weight"}
    # transformers 5 loads a CLIPVisionModel without the vision_model prefix
    assert set(learner_entries({"a.weight": torch.ones(2, 3)}, shapes, "ck")) == {"encoder.vision_model.a.weight"}
    assert set(learner_entries({"encoder.visual_projection.weight": torch.ones(4, 2)}, shapes, "ck")) == {
        "encoder.visual_projection.weight"
    }
    with pytest.raises(MergeclError, match="checkpoint ck: 'vision_model.z' is no entry"):
        learner_entries({"vision_model.z": torch.ones(1)}, shapes, "ck")
    with pytest.raises(MergeclError, match="checkpoint ck: none of its tensors"):
        learner_entries({"text_model.b.weight": torch.ones(7)}, shapes, "ck")
    with pytest.raises(MergeclError, match=r"checkpoint ck: 'vision_model.a.weight' has shape \(3, 2\)"):
        learner_entries({"vision_model.a.weight": torch.ones(3, 2)}, shapes, "ck")


# --- tiny CLIPs, checkpoints and image folders, shared by every case --------------------------------


def tiny_config(tiny_clip, patch: int) -> dict:
    """The conftest tiny CLIP with the architecture's patch size (two patches a side)."""
    config = {key: dict(value) if isinstance(value, dict) else value for key, value in tiny_clip["config"].items()}
    config["vision_config"].update(patch_size=patch, image_size=2 * patch)
    return config


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory, tiny_clip):
    """Per architecture: a tiny CLIPModel directory (theta_0) and, for the last two tasks of every
    suite, a fine-tuned CLIPVisionModel directory (theta_0's image tower, perturbed: saved by
    save_pretrained, every other one rewritten with the ``vision_model.`` keys of the hub's files);
    per task an image folder of two classes."""
    root = tmp_path_factory.mktemp("continual_clip")
    tasks = sorted({t for suite in SUITES.values() for t in suite[-2:]})
    models, checkpoints = {}, {}
    for arch, (_, patch) in ARCHS.items():
        torch.manual_seed(0)
        model = transformers.CLIPModel(transformers.CLIPConfig(**tiny_config(tiny_clip, patch)))
        models[arch] = root / arch / "base"
        model.save_pretrained(models[arch])
        for i, task in enumerate(tasks):
            tower = transformers.CLIPVisionModel(model.config.vision_config)
            state = {k: v + 0.01 * (i + 1) * torch.randn_like(v) for k, v in model.vision_model.state_dict().items()}
            getattr(tower, "vision_model", tower).load_state_dict(state)  # transformers 4 / 5
            checkpoints[arch, task] = root / arch / task
            tower.save_pretrained(checkpoints[arch, task])
            if i % 2:
                save_file(
                    {f"vision_model.{k}": v.contiguous() for k, v in state.items()},
                    checkpoints[arch, task] / "model.safetensors",
                )
    data = root / "data"
    for t, task in enumerate(tasks):
        for split, count in (("train", 4), ("test", 2)):
            for c in range(2):
                folder = data / task / split / f"class {t} {c}"
                folder.mkdir(parents=True)
                for i in range(count):
                    pixels = torch.full((8, 8, 3), 40 * c + 5 * t, dtype=torch.uint8) + i
                    Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")
    return {"models": models, "checkpoints": checkpoints, "data": data, "tokenizer": tiny_clip["tokenizer"]}


def test_vision_tasks_gives_one_task_per_data_set(tiny_suite):
    ds = get_source("vision_tasks", root=tiny_suite["data"], tasks=["mnist", "dtd"], hub=False)
    assert ds.class_groups == {"mnist": [0, 1], "dtd": [2, 3]} and ds.given_tasks
    scenario = build_scenario("task", ds, None)
    assert [task.name for task in scenario.tasks] == ["mnist", "dtd"]
    assert [task.classes for task in scenario.tasks] == [[0, 1], [2, 3]] and scenario.kind == "task"
    with pytest.raises(MergeclError, match="task 'svhn' has no folder"):
        get_source("vision_tasks", root=tiny_suite["data"], tasks=["svhn"], hub=False)


class FakeLabel:
    names = None  # an int column without ClassLabel names (fer2013's "cls")


class FakeRows(list):
    features = {"jpg": object(), "cls": FakeLabel()}


def test_a_missing_task_is_fetched_from_the_hub_once_into_its_folder(tmp_path, monkeypatch):
    """fer2013 as FusionBench reads it (columns jpg / cls, no class names): written as image folders
    named by the source's class names; a second load reads the folder (a fake hub: no network)."""
    calls = []

    def load_dataset(hub_id, config, cache_dir=None):
        calls.append((hub_id, config, cache_dir))
        image = Image.new("L", (4, 4), 128)
        return {split: FakeRows([{"jpg": image, "cls": c} for c in (0, 3, 3)]) for split in ("train", "test")}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    ds = get_source("vision_tasks", root=tmp_path, tasks=["fer2013"], cache_dir="/c")
    assert calls == [("clip-benchmark/wds_fer2013", None, "/c")]
    assert ds.class_names == ["angry", "happy"] and len(ds.train) == 3 and len(ds.test) == 3
    assert sorted(p.name for p in (tmp_path / "fer2013").iterdir()) == ["test", "train"]
    get_source("vision_tasks", root=tmp_path, tasks=["fer2013"])
    assert len(calls) == 1  # read from the folder
    with pytest.raises(MergeclError, match="no hub data set for task 'mine'"):
        get_source("vision_tasks", root=tmp_path, tasks=["mine"])


def test_a_task_without_a_checkpoint_is_one_line_naming_it():
    config = load_config("continual-clip-vit-b32-8").model_dump()
    config["method_options"]["finetuned"]["checkpoints"] = {"dtd": "./nowhere"}
    options = read_options(FinetunedOptions, config["method_options"]["finetuned"], "x")
    task = types.SimpleNamespace(name="mnist")
    step = types.SimpleNamespace(task=task, options=options)
    with pytest.raises(MergeclError, match=r"checkpoints: no checkpoint for task 'mnist' \(given: dtd\)"):
        finetuned_step(step)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_runs_on_tiny_clips(tmp_path, preset, tiny_suite):
    arch = preset.split("-")[-2]
    data = load_config(preset).model_dump()
    tasks = data["data"]["options"]["tasks"][-2:]  # two tasks of the suite; one preset in two task orders
    orders = 2 if preset == PRESETS[0] else 1
    data["data"].update(root=str(tiny_suite["data"]), orders=orders, options={"tasks": tasks, "hub": False})
    data["model"].update(pretrained=str(tiny_suite["models"][arch]), tokenizer=tiny_suite["tokenizer"])
    data["method_options"]["finetuned"]["checkpoints"] = {t: str(tiny_suite["checkpoints"][arch, t]) for t in tasks}
    data["method_options"]["finetuned+dop"] = {"steps": 5}  # the optimisation, shortened
    data.update(device="cpu", keep_vectors=True)
    results, out = run(parse_config(data), out=tmp_path / "r", echo=lambda m: None, report=False)
    methods = results["methods"]
    assert set(methods) == set(load_config(preset).methods)
    assert len(methods["finetuned+opcm"].get("seeds", [0])) == orders  # per-run entries with several
    assert all(len(m["accuracy_matrix"]) == 2 for m in methods.values())

    # task 1's vector is its checkpoint minus theta_0 on the image tower, zero on the projection
    tau = load_file(out / "seed0" / "finetuned" / "task0.safetensors")
    base = transformers.CLIPModel.from_pretrained(tiny_suite["models"][arch])
    tuned = transformers.CLIPVisionModel.from_pretrained(tiny_suite["checkpoints"][arch, tasks[0]])
    expected = getattr(tuned, "vision_model", tuned).post_layernorm.weight - base.vision_model.post_layernorm.weight
    assert torch.allclose(tau["encoder.vision_model.post_layernorm.weight"], expected.detach(), atol=1e-6)
    assert not tau["encoder.visual_projection.weight"].any()
