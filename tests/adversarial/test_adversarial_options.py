"""Every option is checked before any work starts (issue 12): a hostile or mistyped option of a
run config is one line naming the key, raised when the config is read, in well under a second."""

import os
import re
import subprocess
import sys
import time

import pytest
import yaml

import mergecl.methods  # noqa: F401  (imported once here: the timings below are the checks alone)
from mergecl import MergeclError
from mergecl.experiment.config import RunConfig, load_config, parse_config

METHODS = ["seq_ft", "ind_ft", "magmax", "ties", "random_mix", "one_over_t", "lwf", "ewc", "joint", "gpm", "became"]
BASE = {
    "name": "hostile",
    "seeds": [0],
    "data": {"source": "digits", "scenario": "class", "n_tasks": 2},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [16]},
    "train": {"epochs": 1},
    "methods": METHODS + ["pam"],
}


def options(**method_options):
    return {**BASE, "method_options": method_options}


# (config, the error after "<file>: "); each of these was silently accepted, or failed only after
# training had started, before the option schemas
CASES = [
    (options(ewc={"lamda": 5}), r"method_options\.ewc: unknown option 'lamda' \(options: lam, decay, fisher_labels\)$"),
    (options(magmax={"lamm": 0.5}), r"method_options\.magmax: unknown option 'lamm' \(options: lam, .*lam_grid"),
    (options(magmax={"keep": 0.5}), r"method_options\.magmax: unknown option 'keep'"),  # TIES's own option
    (options(ind_ft={"lam": 1}), r"method_options\.ind_ft: unknown option 'lam' \(it takes no options\)$"),
    (options(magmaxx={"lam": 0.5}), r"method_options\.magmaxx: 'magmaxx' is not a method of this run \(methods: "),
    (options(pam={"p": 0.5}) | {"methods": ["seq_ft"]}, r"method_options\.pam: 'pam' is not a method of this run"),
    (options(magmax={"lam": -5}), r"method_options\.magmax\.lam: Input should be greater than 0 or 'auto', got -5$"),
    (options(magmax={"lam": float("inf")}), r"method_options\.magmax\.lam: .*finite number"),
    (options(magmax={"lam": "aut"}), r"method_options\.magmax\.lam: Input should be a valid number or 'auto'"),
    (options(magmax={"lam": "auto", "lam_grid": []}), r"method_options\.magmax\.lam_grid: List should have at least 1"),
    (
        options(magmax={"lam": "auto", "lam_grid": [0.5, -1]}),
        r"method_options\.magmax\.lam_grid\[1\]: .*greater than 0",
    ),
    (options(magmax={"lam_grid": [0.5]}), r"method_options\.magmax: lam_grid is only used with lam: auto$"),
    (options(magmax={"space": "dense"}), r"method_options\.magmax\.space: dense needs a LoRA model"),
    (options(ties={"keep": 0}), r"method_options\.ties\.keep: Input should be greater than 0, got 0"),
    (options(ties={"scope": "model"}), r"method_options\.ties\.scope: Input should be 'global' or 'tensor'"),
    (options(random_mix={"seed": "x"}), r"method_options\.random_mix\.seed: Input should be a valid integer, got 'x'$"),
    (
        options(one_over_t={"start": 0}),
        r"method_options\.one_over_t\.start: Input should be greater than or equal to 1, got 0$",
    ),
    (options(magmax={"include": "("}), r"method_options\.magmax\.include: .*not a valid regular expression"),
    (options(lwf={"temperature": 0}), r"method_options\.lwf\.temperature: Input should be greater than 0, got 0$"),
    (options(lwf={"lam": -1}), r"method_options\.lwf\.lam: Input should be greater than or equal to 0, got -1$"),
    (options(ewc={"lam": "1e3"}), r"method_options\.ewc\.lam: Input should be a valid number, got '1e3'$"),
    (options(ewc={"lam": True}), r"method_options\.ewc\.lam: Input should be a valid number, got True$"),
    (options(ewc={"decay": 2}), r"method_options\.ewc\.decay: Input should be less than or equal to 1, got 2$"),
    (options(ewc={"fisher_labels": "gold"}), r"method_options\.ewc\.fisher_labels: Input should be 'predicted' or"),
    (options(joint={"final_only": "yes"}), r"method_options\.joint\.final_only: Input should be a valid boolean"),
    (options(gpm={"eps": 1.5}), r"method_options\.gpm\.eps: Input should be less than or equal to 1, got 1\.5$"),
    (options(gpm={"samples": 12.5}), r"method_options\.gpm\.samples: Input should be a valid integer, got 12\.5$"),
    (options(gpm={"project_head": "no"}), r"method_options\.gpm\.project_head: Input should be 'auto' or a valid bool"),
    (options(became={"stage2_lr": -1}), r"method_options\.became\.stage2_lr: Input should be greater than 0, got -1$"),
    (options(became={"gama": 1}), r"method_options\.became: unknown option 'gama'"),
    (options(pam={"p": 1.5}), r"method_options\.pam\.p: Input should be less than or equal to 1, got 1\.5$"),
    (options(pam={"align_every": 0}), r"method_options\.pam\.align_every: Input should be greater than or equal to 1"),
    (options(pam={"reset": "none"}), r"method_options\.pam\.reset: Input should be 'value' or 'zero', got 'none'$"),
    (options(seq={}, seq_ft={}), r"method_options: seq and seq_ft both set the options of one training$"),
    (options(ewc=[1]), r"method_options\.ewc: Input should be a valid dictionary"),
    ({**BASE, "train": {"lr": float("inf")}}, r"train\.lr: Input should be a finite number$"),
    ({**BASE, "train": {"lr": float("nan")}}, r"train\.lr: Input should be a finite number$"),
    ({**BASE, "train": {"epochs": float("inf")}}, r"train\.epochs: Input should be a finite number$"),
    ({**BASE, "train": {"momentum": 1.5}}, r"train\.momentum: Input should be less than 1$"),
    ({**BASE, "seeds": [-1]}, r"seeds\.0: Input should be greater than or equal to 0$"),
    ({**BASE, "methods": ["magmix"]}, r"unknown method 'magmix'"),
]


@pytest.mark.parametrize("config, error", CASES, ids=[error[:60] for _, error in CASES])
def test_a_bad_option_is_one_line_naming_the_key_when_the_config_is_read(tmp_path, config, error):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    with pytest.raises(MergeclError) as caught:
        load_config(path)
    assert time.perf_counter() - started < 1.0
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert re.search(error, message.removeprefix(f"{path}: ")), message


def test_good_options_pass_and_the_python_api_checks_them_too():
    good = options(
        magmax={"lam": "auto", "lam_grid": [0.5, 1.0]},
        ties={"keep": 0.2, "scope": "tensor", "dare": 0.5, "seed": 3},
        lwf={"lam": 0.3, "temperature": 2},
        ewc={"lam": 1000, "decay": 0.5, "fisher_labels": "true"},
        joint={"final_only": True},
        became={"stage2_lr": 0.01, "project_head": False},
        pam={"p": 0, "align_every": 3},
    )
    assert parse_config(good).method_options["magmax"]["lam_grid"] == [0.5, 1.0]
    with pytest.raises(MergeclError, match=r"^method_options\.ewc: unknown option 'lamda'"):
        RunConfig(**options(ewc={"lamda": 5}))  # a RunConfig built in Python is checked as well


def test_mergecl_run_refuses_a_bad_option_before_it_writes_anything(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(options(ewc={"lamda": 5})))
    out = tmp_path / "run"
    env = dict(os.environ, MERGECL_QUIET="1", OMP_NUM_THREADS="1")
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "mergecl", "run", str(bad), "--out", str(out)], env=env, capture_output=True, text=True
    )
    assert time.perf_counter() - started < 30  # the interpreter and torch's import; no training
    assert done.returncode == 2
    expected = f"{bad}: method_options.ewc: unknown option 'lamda' (options: lam, decay, fisher_labels)"
    assert done.stderr == f"mergecl: error: {expected}\n"
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, prefix",
    [
        (["merge", "--method", "ties", "--scop", "tensor", "--base", "b", "-o", "o", "f"], "--scop"),
        (["run", "--dry", "c.yaml"], "--dry"),
    ],
)
def test_an_option_is_taken_only_as_spelled_not_as_a_prefix(argv, prefix, tmp_path, monkeypatch, capsys):
    from mergecl.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert f"unrecognized arguments: {prefix}" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
