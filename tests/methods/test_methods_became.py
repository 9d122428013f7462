"""BECAME, GPM and their baselines as trainings: lam*, the 1/t baseline, options, resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mergecl import MergeclError
from mergecl.experiment.config import load_config, parse_config
from mergecl.experiment.rundir import RunDir
from mergecl.experiment.runner import run
from mergecl.methods.became import GPMOptions, became_merge, next_prior, one_over_t_merge
from mergecl.methods.registry import resolve_method, resolve_methods
from mergecl.options import read_options

TINY = {
    "name": "tiny-became",
    "seeds": [0],
    "device": "cpu",
    "data": {"source": "digits", "scenario": "task", "n_tasks": 3},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [32]},
    "train": {"optimizer": "sgd", "lr": 0.05, "epochs": 2, "batch_size": 32, "schedule": "constant"},
    "methods": ["gpm", "became", "gpm_one_over_t", "seq_became"],
    "method_options": {"became": {"samples": 60}, "gpm": {"samples": 60}, "gpm_one_over_t": {"samples": 60}},
}


def quiet(message):
    pass


def test_names_resolve_to_their_own_trainings():
    for name in ("gpm", "became", "gpm_one_over_t", "seq_became"):
        spec = resolve_method(name)
        assert (spec.training, spec.rule) == (name, None)
    assert resolve_method("one_over_t").rule == "one_over_t"  # the merge rule over Seq-FT is unchanged


def test_lambda_star_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    theta_gp = {"a.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(3, generator=g)}
    theta_gp["buffer"] = torch.randn(2, generator=g)  # a float buffer: no Fisher, d = 0
    theta_hat = {k: v + torch.randn(v.shape, generator=g) for k, v in theta_gp.items()}
    theta_hat["buffer"] = theta_gp["buffer"].clone()
    fisher = {k: torch.rand(theta_gp[k].shape, generator=g) for k in ("a.weight", "a.bias")}
    prior = {k: 2 * torch.rand(theta_gp[k].shape, generator=g) for k in ("a.weight", "a.bias")}
    merged, lam = became_merge(theta_gp, theta_hat, fisher, prior)
    num = sum(float((fisher[k].double() * (theta_hat[k] - theta_gp[k]).double() ** 2).sum()) for k in fisher)
    den = sum(
        float(((fisher[k].double() + prior[k].double()) * (theta_hat[k] - theta_gp[k]).double() ** 2).sum())
        for k in fisher
    )
    assert lam == pytest.approx(num / den, rel=1e-9)
    assert 0 < lam < 1
    for k in theta_gp:
        assert torch.allclose(merged[k], (1 - lam) * theta_gp[k] + lam * theta_hat[k], atol=1e-6)
    # equal Fishers everywhere give 1/2 -- the 1/t rule at t = 2
    _, half = became_merge(theta_gp, theta_hat, fisher, fisher)
    assert half == pytest.approx(0.5)


def test_prior_precision_accumulates_with_gamma():
    f1, f2 = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.5, 0.5])}
    first = next_prior(f1, None, 1.0)
    assert torch.equal(first["w"], f1["w"]) and first["w"] is not f1["w"]
    assert torch.equal(next_prior(f2, first, 1.0)["w"], torch.tensor([1.5, 2.5]))
    assert torch.equal(next_prior(f2, first, 0.5)["w"], torch.tensor([1.0, 1.5]))


def test_one_over_t_merge():
    theta_gp, theta_hat = {"w": torch.zeros(4)}, {"w": torch.full((4,), 6.0)}
    assert torch.allclose(one_over_t_merge(theta_gp, theta_hat, 3)["w"], torch.full((4,), 2.0))


def test_options_are_checked_and_errors_name_the_key():
    assert read_options(GPMOptions, {"eps": 0.9}, "method_options.gpm").eps == 0.9
    with pytest.raises(MergeclError, match=r"method_options.gpm: unknown option 'epz'"):
        read_options(GPMOptions, {"epz": 0.9}, "method_options.gpm")
    with pytest.raises(MergeclError, match=r"method_options.gpm.eps: Input should be less than or equal to 1, got 1.5"):
        read_options(GPMOptions, {"eps": 1.5}, "method_options.gpm")
    with pytest.raises(MergeclError, match=r"method_options.gpm.samples"):
        read_options(GPMOptions, {"samples": 0}, "method_options.gpm")
    with pytest.raises(MergeclError, match=r"config: method_options.became.stage2_lr: Input should be greater than 0"):
        parse_config({**TINY, "method_options": {"became": {"stage2_lr": 0}}})


def test_trainings_log_lambda_and_resume_from_their_carried_state(tmp_path):
    results, out = run(parse_config(TINY), out=tmp_path / "run", echo=quiet, report=False)
    methods = results["methods"]
    assert methods["gpm_one_over_t"]["step_info"]["lambda"] == pytest.approx([1.0, 1 / 2, 1 / 3])
    for name in ("became", "seq_became"):
        lam = methods[name]["step_info"]["lambda"]
        assert len(lam) == 3 and lam[0] == 1.0 and all(0 < x <= 1 for x in lam), (name, lam)
    for name in ("gpm", "became", "gpm_one_over_t"):
        fill = methods[name]["step_info"]["basis_fill"]
        assert all(0 < a <= b <= 1 for a, b in zip(fill, fill[1:], strict=False)), fill  # the memory only grows
    carried = RunDir(out).load_tensors(RunDir(out).state_path(0, "became", 1))
    assert any(k.startswith("gpm/") for k in carried) and any(k.startswith("prior/") for k in carried)

    # resuming a finished run keeps the numbers
    again, _ = run(resume=out, echo=quiet, report=False)
    assert strip(again) == strip(results)

    # undo the last step of every training (its commit marker, state, rows and logged info): the
    # resumed run retrains it from the carried state of step 2 and must land on the same numbers
    partial = tmp_path / "partial"
    shutil.copytree(out, partial)
    for name in TINY["methods"]:
        (partial / "seed0" / name / "task2.safetensors").unlink()
        (partial / "seed0" / name / "state2.safetensors").unlink(missing_ok=True)
    progress = json.loads((partial / "progress.json").read_text())
    seed = progress["seeds"]["0"]
    for name in TINY["methods"]:
        seed["rows"][name] = seed["rows"][name][:2]
        seed["stream_info"][name].pop("2")
        seed["all_class_acc"].pop(name, None)
    (partial / "progress.json").write_text(json.dumps(progress))
    resumed, _ = run(resume=partial, echo=quiet, report=False)
    assert strip(resumed) == strip(results)


def strip(results):
    out = {}
    for name, entry in results["methods"].items():
        out[name] = {k: v for k, v in entry.items() if k not in ("wall_time_s", "std")}
    return out


def test_the_evidence_configs_parse():
    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("became-*.yaml"))
    assert len(configs) >= 4  # the cifar100 paper presets are packaged (tests/models/test_models_alexnet.py)
    for path in configs:
        config = load_config(path)
        assert {spec.training for spec in resolve_methods(config.methods)} >= {"gpm", "became", "gpm_one_over_t"}
