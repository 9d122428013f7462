"""A run goes on from a merge's running state between the steps of a stream (``Runner.running_merge``)
for the rules whose running form is their merge (no random draws): each step then reads one task
vector, not t. The numbers are those of merging tau_1..tau_t from scratch at every step, also when
the state is lost (a resumed run) and rebuilt from the stored task vectors."""

from __future__ import annotations

import pytest

from mergecl.experiment.config import parse_config
from mergecl.experiment.runner import Runner, run

CONFIG = {
    "name": "running",
    "seeds": [0],
    "data": {"source": "digits", "scenario": "class", "n_tasks": 3},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [24]},
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "methods": ["seq_ft", "magmax", "average", "task_arithmetic", "opcm", "ind_ft+opcm", "ind_ft+dop", "random_mix"]
    + ["magmax@auto", "ties"],
    "method_options": {
        "magmax@auto": {"lam": "auto", "lam_grid": [0.5, 1.0]},
        "opcm": {"alpha": 0.7},
        "ind_ft+dop": {"steps": 30},
    },
}
QUIET = dict(echo=lambda message: None, report=False)


def rows(out) -> dict:
    import json

    seed = json.loads((out / "progress.json").read_text())["seeds"]["0"]
    return {"rows": seed["rows"], "lam": {k: v for k, v in seed.get("method_info", {}).items() if "auto" in k}}


@pytest.fixture(scope="module")
def running_run(tmp_path_factory):
    used: list[str] = []
    original = Runner.running_merge

    def spy(self, seed, spec, paths, options):
        merge = original(self, seed, spec, paths, options)
        if merge is not None:
            used.append(spec.name)
        return merge

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Runner, "running_merge", spy)
        _, out = run(parse_config(CONFIG), out=tmp_path_factory.mktemp("running") / "run", **QUIET)
    return out, used


def test_the_running_rules_go_on_from_their_state_and_random_mix_and_ties_do_not(running_run):
    _, used = running_run
    assert set(used) == {"magmax", "average", "task_arithmetic", "opcm", "ind_ft+opcm", "ind_ft+dop", "magmax@auto"}
    assert used.count("opcm") == 3  # one per step


def test_the_running_state_gives_the_numbers_of_merging_from_scratch(running_run, tmp_path, monkeypatch):
    out, _ = running_run
    monkeypatch.setattr(Runner, "running_merge", lambda self, *args: None)  # every step: the engine's merge 1..t
    _, scratch = run(parse_config(CONFIG), out=tmp_path / "scratch", **QUIET)
    assert rows(scratch) == rows(out)


def test_a_lost_running_state_is_rebuilt_from_the_stored_task_vectors(running_run, tmp_path, monkeypatch):
    out, _ = running_run
    original = Runner.running_merge

    def forgetful(self, seed, spec, paths, options):
        self.running.clear()  # as after a resume: the state is rebuilt from tau_1..tau_{t-1}
        return original(self, seed, spec, paths, options)

    monkeypatch.setattr(Runner, "running_merge", forgetful)
    _, resumed = run(parse_config(CONFIG), out=tmp_path / "resumed", **QUIET)
    assert rows(resumed) == rows(out)
