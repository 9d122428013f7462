"""Benchmark suites (--quick, as CI runs them) and the paper presets (one tiny step each)."""

import pytest
import torch
from PIL import Image

from mergecl.experiment.bench import SUITES, suite_config
from mergecl.experiment.config import load_config, packaged_configs, parse_config, run_seeds
from mergecl.experiment.runner import run

transformers = pytest.importorskip("transformers")


# fewer tasks than the suite, for CI's time: the pipeline is the same at every step
FEWER_TASKS = {
    "clinc150": {"options": {"domains": ["banking", "credit_cards", "travel", "meta"]}},
    "banking77": {"n_tasks": 3},
}


def on_real_data(config, text_data):
    """The suite's config on the full data set when it is here, else on the subset in the package,
    cut to fewer tasks (``FEWER_TASKS``)."""
    data = config.data.model_copy(update={**text_data(config.data.source), **FEWER_TASKS[config.data.source]})
    return config.model_copy(update={"data": data})


@pytest.mark.slow  # the real MiniLM through a whole suite: ~1 min each
@pytest.mark.parametrize("suite, num_classes", [("clinc150-cil", 150), ("banking77-cil", 77)])
def test_quick_suite_runs_and_beats_chance(tmp_path, suite, num_classes, text_data):
    config = on_real_data(suite_config(suite, quick=True), text_data)
    results, out = run(config, out=tmp_path / suite, echo=lambda m: None, report=False)
    chance = 100.0 / num_classes
    methods = results["methods"]
    assert set(methods) == {"zero_shot", "seq_ft", "magmax", "ind_ft+magmax", "magmax@auto"}
    for name, entry in methods.items():
        assert entry["all_class_acc"] > 3 * chance, name
    assert methods["magmax@auto"]["step_info"]["lam"]  # lam chosen on validation at every step
    assert not list(out.rglob("*.safetensors"))  # suites keep numbers, not a finished seed's tensors


@pytest.mark.slow
@pytest.mark.parametrize("suite", ["clinc150-cil-pam"])
def test_quick_pam_suite_trains_lora_and_beats_chance(tmp_path, suite, text_data):
    config = on_real_data(suite_config(suite, quick=True), text_data)
    config = config.model_copy(update={"keep_vectors": True})  # read a task vector below
    results, out = run(config, out=tmp_path / suite, echo=lambda m: None, report=False)
    methods = results["methods"]
    assert set(methods) == {"zero_shot", "seq_ft", "ind_ft+average", "pam", "pam@zero"}
    for name, entry in methods.items():
        assert entry["all_class_acc"] > 3 * 100.0 / 150, name
    assert methods["pam@zero"]["step_info"]["reset_fraction"][-1] > 0  # alignment ran
    from safetensors.torch import load_file

    tau = load_file(out / "seed0" / "pam" / "task1.safetensors")
    assert not any("base_layer" in key for key in tau)  # the frozen encoder is not in the task vectors
    assert any("lora_B" in key and v.abs().max() > 0 for key, v in tau.items())  # the adapters moved


def test_pam_suites_train_the_same_adapters_for_every_method():
    for suite in ("clinc150-cil-pam", "banking77-cil-pam"):
        full = suite_config(suite)
        assert len(full.seeds) >= 3 and full.model["lora"]["rank"] == 32
        assert {"seq_ft", "ind_ft+average", "magmax", "ties", "pam", "pam@zero", "pam@p0", "pam@p100"} <= set(
            full.methods
        )


def test_suites_are_valid_configs():
    for suite in (s for s in SUITES if not s.endswith(("-pam", "-continual", "-continual-svd", "-continual-dop"))):
        full = suite_config(suite)
        assert len(full.seeds) >= 3 and full.model["name"] == "hf_text"
        assert {"zero_shot", "joint", "seq_ft", "ind_ft", "lwf", "ewc"} <= set(full.methods)
        for rule in ("magmax", "average", "task_arithmetic", "random_mix", "ties"):
            assert rule in full.methods and f"ind_ft+{rule}" in full.methods and f"{rule}@auto" in full.methods


def test_continual_merging_suites_cover_the_protocol():
    """Every rule over Ind-FT and Seq-FT task vectors, at least 5 task orders x 3 seeds."""
    for suite in (s for s in SUITES if s.endswith("-continual")):
        full = suite_config(suite)
        assert len(full.seeds) >= 3 and full.data.orders >= 5
        for rule in ("magmax", "average", "task_arithmetic", "ties", "iso_c", "opcm"):
            assert rule in full.methods and f"ind_ft+{rule}" in full.methods, (suite, rule)
        svd = suite_config(f"{suite}-svd")  # the same tasks: its streams are the first orders of seed 0
        assert svd.data.model_copy(update={"orders": 1}) == full.data.model_copy(update={"orders": 1})
        assert (svd.model, svd.train, svd.seeds) == (full.model, full.train, full.seeds[:1])
        for rule in ("tsv_m", "iso_cts", "knots", "continual_ties", "opcm", "magmax"):
            assert f"ind_ft+{rule}" in svd.methods, (suite, rule)
    cut = suite_config("clinc150-continual", orders=2)  # `mergecl bench ... --orders 2`: the same first streams
    full = suite_config("clinc150-continual")
    assert cut.data.orders == 2 and set(run_seeds(cut)) < set(run_seeds(full)) and len(run_seeds(cut)) == 6
    dop = suite_config("banking77-continual-dop")  # DOP: the first stream of banking77-continual
    full = suite_config("banking77-continual")
    assert dop.data.model_copy(update={"orders": 1}) == full.data.model_copy(update={"orders": 1})
    assert (dop.model, dop.train, dop.seeds, dop.data.orders) == (full.model, full.train, full.seeds[:1], 1)
    assert {"ind_ft+dop", "ind_ft+opcm"} <= set(dop.methods)


PRESETS = sorted(name for name in packaged_configs() if name.startswith("magmax-clip-"))
FAMILIES = [
    "magmax-clip-cifar100-cil10",
    "magmax-clip-imagenet-r-cil5",
    "magmax-clip-cub200-cil20",
    "magmax-clip-cars-cil5",
    "magmax-clip-domainnet-dil",
    "pam-clip-cifar100-cil10",
]


def test_every_paper_preset_is_there_and_valid():
    expected = {f"magmax-clip-{d}-cil{n}" for d in ("cifar100", "imagenet-r") for n in (5, 10, 20, 50)}
    expected |= {f"magmax-clip-{d}-cil{n}" for d in ("cub200", "cars") for n in (5, 10, 20)}
    expected |= {"magmax-clip-imagenet-r-dil", "magmax-clip-domainnet-dil"}
    assert set(PRESETS) == expected
    for name in PRESETS:
        config = load_config(name)
        assert config.train.lr == 1e-5 and config.train.batch_size == 128 and config.train.warmup_steps == 500
        assert config.model["pretrained"] == "openai/clip-vit-base-patch16" and config.model["head"] == "zero_shot"


def test_pam_clip_presets_follow_the_magmax_sequences_with_lora():
    pam = sorted(name for name in packaged_configs() if name.startswith("pam-clip-"))
    assert len(pam) == 6
    for name in pam:
        config, twin = load_config(name), load_config(name.replace("pam-clip-", "magmax-clip-"))
        assert config.data == twin.data and config.model["lora"]["target_modules"] == ["q_proj", "v_proj"]
        assert {"seq_ft", "ind_ft+average", "magmax", "ties", "pam", "pam@zero"} <= set(config.methods)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for c, name in enumerate(["cat", "dog", "car", "bird"]):
        (root / name).mkdir()
        for i in range(6):
            colour = torch.full((24, 24, 3), 60 * c, dtype=torch.uint8) + torch.randint(
                0, 20, (24, 24, 3), dtype=torch.uint8
            )
            Image.fromarray(colour.numpy()).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("preset", FAMILIES)
def test_paper_preset_runs_a_step_on_a_tiny_clip(tmp_path, preset, tiny_clip, image_folder):
    data = load_config(preset).model_dump()
    # the preset's model, training settings and methods; a tiny random CLIP of the same structure and a tiny
    # image folder instead of the download (the real loaders are tested on fake layouts in tests/data)
    data["model"].update(pretrained=None, **tiny_clip)
    data["data"] = {
        "source": "image_folder",
        "root": str(image_folder),
        "scenario": "class",
        "n_tasks": 2,
        "order": "seeded",
    }
    data["train"].update(epochs=0.01)
    data["device"] = "cpu"
    results, _ = run(parse_config(data), out=tmp_path / "r", echo=lambda m: None, report=False)
    assert set(results["methods"]) == set(load_config(preset).methods)
    assert all(len(m["accuracy_matrix"]) == 2 for m in results["methods"].values())
