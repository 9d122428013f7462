"""PAM (sign alignment + averaging) and LoRA adapters: the math, the hook, and runs over LoRA models."""

import pytest
import torch

from mergecl import MergeclError
from mergecl.experiment.config import parse_config
from mergecl.experiment.runner import run
from mergecl.methods.pam import Alignment, PamOptions, align_, conflicts, running_mean, top_fraction_masks
from mergecl.models.factory import build_learner
from mergecl.models.lora import dense_task_vector, fold_dense, lora_pairs
from mergecl.options import read_options

LORA_MLP = {"name": "mlp", "in_dim": 64, "hidden": [32], "lora": {"rank": 4, "target_modules": ["layers.0"]}}


def test_top_fraction_per_tensor_and_global():
    g = {"a": torch.tensor([1.0, -4.0, 2.0, 0.5]), "b": torch.tensor([10.0, -0.1])}
    per = top_fraction_masks(g, 0.5, "tensor")
    assert per["a"].tolist() == [False, True, True, False] and per["b"].tolist() == [True, False]
    glob = top_fraction_masks(g, 0.5, "global")  # top 3 of 6: 10, -4, 2
    assert glob["a"].tolist() == [False, True, True, False] and glob["b"].tolist() == [True, False]
    assert not any(m.any() for m in top_fraction_masks(g, 0.0, "tensor").values())
    assert all(m.all() for m in top_fraction_masks(g, 1.0, "global").values())


def test_align_resets_only_conflicts_among_the_top_entries():
    g = torch.tensor([3.0, -3.0, 0.1, -2.0, 0.0])
    top = torch.tensor([True, True, False, True, True])
    task = torch.tensor([-1.0, -1.0, -5.0, 4.0, 7.0])
    assert conflicts(task, g, top).tolist() == [True, False, False, True, False]  # 0.1 not in top; G=0 agrees
    value = task.clone()
    assert align_(value, g, top, "value") == 2 and value.tolist() == [3.0, -1.0, -5.0, -2.0, 7.0]
    zero = task.clone()
    assert align_(zero, g, top, "zero") == 2 and zero.tolist() == [0.0, -1.0, -5.0, 0.0, 7.0]


def test_running_mean_is_the_mean_of_the_task_models_and_half_is_fifty_fifty():
    tasks = [torch.randn(5) for _ in range(4)]
    g = tasks[0]
    for t, task in enumerate(tasks[1:], start=2):
        g = running_mean(g, task, t, "mean")
    assert torch.allclose(g, torch.stack(tasks).mean(0), atol=1e-6)
    assert torch.equal(running_mean(tasks[0], tasks[1], 1, "half"), tasks[1])
    assert torch.allclose(running_mean(tasks[0], tasks[1], 3, "half"), (tasks[0] + tasks[1]) / 2)


def test_alignment_hook_leaves_no_conflict_on_a_lora_learner():
    torch.manual_seed(0)
    learner = build_learner(LORA_MLP, ["a", "b", "c"])
    trained = {n: p for n, p in learner.named_parameters() if p.requires_grad}
    assert set(trained) == {
        "encoder.layers.0.lora_A.default.weight",
        "encoder.layers.0.lora_B.default.weight",
        "head.weight",
        "head.bias",
    }
    g = {n: torch.randn_like(p) for n, p in trained.items()}
    with torch.no_grad():
        for p in trained.values():
            p.copy_(torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in trained.items()}
    hook = Alignment(g, PamOptions(p=0.5, reset="value"))
    hook.after_step(learner, 9)  # not an alignment step (every 10)
    assert all(torch.equal(before[n], p) for n, p in trained.items())
    hook.after_step(learner, 10)
    assert hook.resets > 0
    for n, p in trained.items():
        assert not conflicts(p, g[n], hook.top[n]).any(), n
        untouched = ~hook.top[n]
        assert torch.equal(p[untouched], before[n][untouched]), n


def test_lora_freezes_the_base_and_the_dense_fold_computes_the_same_function():
    torch.manual_seed(0)
    learner = build_learner(LORA_MLP, ["a", "b"])
    base = {k: v.clone() for k, v in learner.state_dict().items()}
    assert not learner.encoder.layers[0].base_layer.weight.requires_grad
    with torch.no_grad():
        for n, p in learner.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(7, 64)
    expected = learner(x)
    state = learner.state_dict()
    tau = {k: state[k] - base[k] for k in state if "lora_" in k}
    pairs = lora_pairs(learner)
    assert len(pairs) == 1 and pairs[0].scaling == 1.0
    dense = dense_task_vector(base, tau, pairs)
    folded = fold_dense(base, {k: base[k] + v for k, v in dense.items()}, pairs)
    learner.load_state_dict(folded)
    assert torch.allclose(learner(x), expected, atol=1e-5)
    assert torch.count_nonzero(folded[pairs[0].b]) == 0  # the adapter is off: W holds the change


def test_lora_options_are_checked():
    with pytest.raises(MergeclError, match="model.lora.rank"):
        build_learner({**LORA_MLP, "lora": {"rank": 0, "target_modules": ["layers.0"]}}, ["a"])
    with pytest.raises(MergeclError, match="model.lora.target_modules: required for mlp"):
        build_learner({**LORA_MLP, "lora": {"rank": 2}}, ["a"])
    with pytest.raises(MergeclError, match="model.lora.nope"):
        build_learner({**LORA_MLP, "lora": {"nope": 1, "target_modules": ["layers.0"]}}, ["a"])
    with pytest.raises(MergeclError, match="not found"):
        build_learner({**LORA_MLP, "lora": {"target_modules": ["missing"]}}, ["a"])
    with pytest.raises(MergeclError, match=r"method_options.pam.p"):
        read_options(PamOptions, {"p": 1.5}, "method_options.pam")
    with pytest.raises(MergeclError, match="unknown option 'period'"):
        read_options(PamOptions, {"period": 3}, "method_options.pam")


LORA_RUN = {
    "name": "lora",
    "seeds": [0],
    "data": {"source": "digits", "scenario": "class", "n_tasks": 3},
    "model": LORA_MLP,
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.01},
    "methods": ["seq_ft", "pam", "pam@zero", "pam@p0", "ind_ft+average", "ind_ft+average@dense", "magmax", "ties"],
    "method_options": {
        "pam@zero": {"reset": "zero", "align_every": 5},
        "pam@p0": {"p": 0.0},
        "ind_ft+average@dense": {"space": "dense"},
    },
}


def test_a_lora_run_trains_only_adapters_and_every_method_reports(tmp_path):
    results, out = run(parse_config(LORA_RUN), out=tmp_path / "r", echo=lambda m: None, report=False)
    m = results["methods"]
    assert set(m) == set(LORA_RUN["methods"])
    for name, entry in m.items():
        assert 0 <= entry["final_acc"] <= 100 and entry["bwt"] is not None, name
    from safetensors.torch import load_file

    tau = load_file(out / "seed0" / "pam" / "task1.safetensors")
    assert tau and all("lora_" in k or k.startswith("head.") for k in tau)  # the frozen base is not a task vector
    assert (out / "seed0" / "pam@zero" / "task2.safetensors").exists()  # a variant is its own training
    # a variant is trained with its own options: resets happened, and not with p = 0
    assert m["pam"]["step_info"]["reset_fraction"][1] > 0
    assert "step_info" not in m["pam@p0"]
    # one task: a merge of one LoRA is that LoRA, in factor space and in dense space alike
    assert m["ind_ft+average@dense"]["accuracy_matrix"][0][0] == pytest.approx(
        m["ind_ft+average"]["accuracy_matrix"][0][0]
    )
    assert m["pam"]["accuracy_matrix"][0] == m["pam@p0"]["accuracy_matrix"][0]  # task 1 trains without alignment


def test_dense_space_needs_a_lora_model(tmp_path):
    config = dict(
        LORA_RUN,
        model={"name": "mlp", "in_dim": 64, "hidden": [32]},
        methods=["magmax@d"],
        method_options={"magmax@d": {"space": "dense"}},
    )
    with pytest.raises(MergeclError, match="dense needs a LoRA model"):
        run(parse_config(config), out=tmp_path / "r", echo=lambda m: None, report=False)


def test_the_dense_evidence_config_is_the_pam_suite_with_each_rule_in_both_spaces():
    from pathlib import Path

    from mergecl.experiment.bench import suite_config
    from mergecl.experiment.config import load_config

    config = load_config(Path(__file__).resolve().parents[2] / "configs" / "pam-clinc150-dense.yaml")
    suite = suite_config("clinc150-cil-pam")
    assert (config.data, config.model, config.train, config.seeds) == (
        suite.data,
        suite.model,
        suite.train,
        suite.seeds,
    )
    merges = [m for m in config.methods if m not in ("seq_ft", "ind_ft")]
    assert sorted(f"{m}@dense" for m in merges if "@" not in m) == sorted(m for m in merges if "@" in m)
    assert all(config.method_options[m] == {"space": "dense"} for m in merges if "@" in m)
