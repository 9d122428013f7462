"""`mergecl list`, `mergecl run CONFIG --dry-run` and `mergecl completion` (issue 15: a CLI that tells
what it can do). The expectations are generated from the registries, never written out by hand."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mergecl.data  # noqa: F401  (the built-in sources register)
import mergecl.methods  # noqa: F401  (the built-in trainings register)
import mergecl.models  # noqa: F401  (the built-in backbones register)
from mergecl.cli import DEFAULT_RUN_TIME, main
from mergecl.data.registry import SOURCES
from mergecl.experiment.config import load_config, packaged_configs
from mergecl.experiment.plan import SECTIONS
from mergecl.experiment.runner import run_scenario
from mergecl.merging.registry import all_rules
from mergecl.methods.registry import cl_rules
from mergecl.methods.trainings import TRAININGS
from mergecl.models.registry import BACKBONES


def listed(capsys, *args):
    assert main(["list", *args]) == 0
    return capsys.readouterr().out


def item_line(out: str, name: str) -> str:
    """The line that lists item ``name`` (two spaces in, the name, then its summary)."""
    lines = [line for line in out.splitlines() if line.startswith(f"  {name} ")]
    assert lines, f"{name} is not listed"
    return lines[0]


def block(out: str, name: str) -> list[str]:
    """The lines under item ``name``: its options."""
    lines = out.splitlines()
    start = lines.index(item_line(out, name)) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("      ")), len(lines))
    return lines[start:end]


def shown(value) -> str:
    if value is None or isinstance(value, bool):
        return str(value).lower().replace("none", "null")
    return repr(value) if isinstance(value, str) else str(value)


def test_list_rules_gives_every_rule_with_its_default_lam_and_options(capsys):
    out = listed(capsys, "rules")
    for name, rule in all_rules().items():
        line = item_line(out, name)
        assert f"lam {'computed' if rule.lam is None else f'{rule.lam:g}'}" in line, line
        assert f"granularity {rule.granularity}" in line and rule.summary in line
        options = block(out, name)
        for option, spec in rule.options.model_fields.items():
            assert any(o.startswith(f"      {option} (") and f"default {shown(spec.default)}" in o for o in options)
        for key in rule.inputs:
            assert any(o.startswith(f"      input {key}: ") for o in options)
    assert "every rule also takes:" in out and "      dare (float, default 0.0, >= 0, < 1)" in out


def test_list_methods_gives_every_training_method_the_naming_forms_and_the_merge_options(capsys):
    out = listed(capsys, "methods")
    for training in TRAININGS.values():
        assert training.summary in item_line(out, training.method)
        options = block(out, training.method)
        for option, spec in training.options.model_fields.items():
            assert any(o.startswith(f"      {option} (") and f"default {shown(spec.default)}" in o for o in options)
    for form in ("RULE", "seq_ft+RULE", "ind_ft+RULE", "NAME@TAG"):
        item_line(out, form)
    assert ", ".join(cl_rules()) in item_line(out, "RULE")
    for option in ("lam (float | 'auto' | null, default null)", "lam_grid (", "space ('factors' | 'dense'"):
        assert f"      {option}" in out


def test_list_presets_sources_and_backbones_give_every_registered_one(capsys):
    out = listed(capsys, "presets")
    for name, path in packaged_configs().items():
        first_comment = next(line for line in path.read_text().splitlines() if line.startswith("#"))
        assert first_comment.lstrip("#").strip() in item_line(out, name)
    assert "(name: digits-cil)" in item_line(out, "digits")
    out = listed(capsys, "sources")
    for name, source in SOURCES.items():
        assert source.summary in item_line(out, name)
    assert "hub_id (str, required, length >= 1)" in out
    out = listed(capsys, "backbones")
    for name, backbone in BACKBONES.items():
        assert backbone.summary in item_line(out, name)
    assert "in_dim (int, required, >= 1): the flattened input size" in out and "model.lora:" in out


def test_list_without_a_section_gives_all_and_json_parses(capsys):
    out = listed(capsys)
    assert [line.split(" ")[0] for line in out.splitlines() if line and not line.startswith(" ")] == list(SECTIONS)
    listing = json.loads(listed(capsys, "--json"))
    assert list(listing) == list(SECTIONS)
    rules = {item["name"]: item for item in listing["rules"]["items"]}
    assert {name: item["lam"] for name, item in rules.items()} == {name: r.lam for name, r in all_rules().items()}
    assert [item["name"] for item in listing["methods"]["items"]] == [t.method for t in TRAININGS.values()]
    assert [item["name"] for item in listing["presets"]["items"]] == list(packaged_configs())
    assert [item["name"] for item in listing["sources"]["items"]] == list(SOURCES)
    assert [item["name"] for item in listing["backbones"]["items"]] == list(BACKBONES)
    keep = next(f for f in rules["ties"]["options"] if f["name"] == "keep")
    assert keep["default"] == 0.2 and keep["range"] == "> 0, <= 1"
    assert json.loads(listed(capsys, "sources", "--json")).keys() == {"sources"}


PLUGIN = '''
from pydantic import Field

from mergecl.merging import register_rule
from mergecl.methods.trainings import register_training
from mergecl.options import Options


@register_rule("entrywise_min", granularity="stack", lam=0.7)
def entrywise_min(taus):
    """The entry-wise smallest task vector."""
    return taus.min(dim=0).values


class FrozenOptions(Options):
    strength: float = Field(2.5, ge=0, description="how frozen")


register_training("frozen", None, continues=False, options=FrozenOptions, summary="a plugin's training")
'''


def test_a_plugin_given_with_plugin_is_listed(tmp_path):
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    env = dict(os.environ, OMP_NUM_THREADS="1", MERGECL_QUIET="1")
    done = subprocess.run(
        [sys.executable, "-m", "mergecl", "--plugin", "my_plugin.py", "list"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    line = item_line(done.stdout, "entrywise_min")
    assert "The entry-wise smallest task vector." in line and "lam 0.7" in line and "granularity stack" in line
    assert "a plugin's training" in item_line(done.stdout, "frozen")
    assert "      strength (float, default 2.5, >= 0): how frozen" in done.stdout
    assert "entrywise_min" in item_line(done.stdout, "RULE")  # a CL method too


def test_the_program_starts_without_collections_and_leaves_them_on_with_the_imports_frozen(tmp_path):
    probe = (
        "import gc, sys\n"
        "from mergecl.cli import main\n"
        "sys.argv = ['mergecl', 'list', 'rules']\n"
        "assert main() == 0\n"
        "print('enabled', gc.isenabled(), 'frozen', gc.get_freeze_count())\n"
        "assert main(['list', 'rules']) == 0\n"  # a caller's argv: its process is left as it is
        "print('again', gc.get_freeze_count())\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MERGECL_QUIET="1")
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    frozen = int(words[words.index("frozen") + 1])
    assert words[words.index("enabled") + 1] == "True" and frozen > 100_000  # torch's modules among them
    assert int(words[words.index("again") + 1]) <= frozen  # nothing more frozen (some frozen objects freed)


@pytest.mark.parametrize(
    "argv, code",
    [(["list", "rules"], 0), (["merge", "--scop", "x"], 2), (["merge", "--help"], 0)],
)
def test_the_program_ends_without_teardown_but_runs_exit_handlers_and_flushes(tmp_path, argv, code):
    """``program()`` leaves by ``os._exit`` (no interpreter teardown): the exit status, the output
    and the ``atexit`` handlers are what a normal exit gives; a running thread gets the normal exit."""
    probe = (
        "import atexit, sys, threading, time\n"
        "from mergecl.cli import program\n"
        "atexit.register(print, 'exit handler ran')\n"
        "if sys.argv[1] == 'thread':\n"
        "    threading.Thread(target=lambda: (time.sleep(0.5), print('thread finished'))).start()\n"
        "sys.argv = ['mergecl', *sys.argv[2:]]\n"
        "program()\n"
        "print('not reached')\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", MERGECL_QUIET="1")
    for mode in ("alone", "thread"):
        done = subprocess.run(
            [sys.executable, "-c", probe, mode, *argv], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == code, done.stderr
        assert done.stdout.rstrip().endswith("exit handler ran") and "not reached" not in done.stdout
        assert ("thread finished" in done.stdout) == (mode == "thread")
        assert ("usage: mergecl merge" in done.stdout + done.stderr) == (argv[0] == "merge")


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    assert main(["run", "digits", "--dry-run", "--out", str(out)]) == 0
    assert main(["run", "digits", "--dry-run"]) == 0  # no --out: runs/NAME-TIME is not made either
    plan = capsys.readouterr().out
    assert not out.exists() and list(tmp_path.iterdir()) == []
    config = load_config("digits")
    scenario = run_scenario(config, config.seeds[0])
    assert "seeds: 0, 1, 2" in plan and "device: cpu" in plan
    for i, task in enumerate(scenario.tasks):
        sizes = f"train {len(task.train)}, val {len(task.val)}, test {len(task.test)}"
        assert f"  task {i + 1} {task.name!r}: {len(task.classes)} classes" in plan and sizes in plan
    settings = config.train
    steps = sum(math.ceil(settings.epochs * math.ceil(len(t.train) / settings.batch_size)) for t in scenario.tasks)
    assert (
        f"  seq          -> seq_ft, magmax, average, ties, random_mix (continues from its previous model; {steps} steps"
        in plan
    )
    assert f"  ind          -> ind_ft+magmax (each task from theta_0; {steps} steps per seed)" in plan
    assert f"training steps: {5 * steps} per seed, {15 * steps} in all" in plan  # seq, ind, lwf, ewc, joint
    n = len(scenario.tasks)
    assert f"evaluations: {len(config.methods) * n * n} per seed" in plan  # every model on every task
    assert "cost estimate: about" in plan and "forward passes" in plan


BAD = {
    "unknown key": "data: {n_taks: 3}\n",
    "unknown method": "methods: [seq_ft, magmaxx]\n",
    "bad option": "methods: [seq_ft, magmax]\nmethod_options: {magmax: {lam: -1}}\n",
    "not YAML": "methods: [seq_ft\n",
}


@pytest.mark.parametrize("case", BAD)
def test_a_bad_config_under_dry_run_is_the_same_one_line_error(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.yaml").write_text(BAD[case])
    assert main(["run", "bad.yaml", "--dry-run"]) == 2
    dry = capsys.readouterr().err
    assert main(["run", "bad.yaml", "--out", "x"]) == 2
    assert capsys.readouterr().err == dry
    assert dry.startswith("mergecl: error: bad.yaml: ") and dry.count("\n") == 1, dry
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


def test_dry_run_goes_with_a_config_not_resume(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path), "--dry-run"]) == 2
    assert "--dry-run goes with a CONFIG" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
def test_completion_completes_commands_names_and_configs(tmp_path, capsys):
    assert main(["completion", "bash"]) == 0
    (tmp_path / "mergecl.bash").write_text(capsys.readouterr().out)
    probe = """source ./mergecl.bash
comp() { COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMPREPLY=(); _mergecl; echo "${COMPREPLY[*]}"; }
comp mergecl li
comp mergecl --plugin x.py r
comp mergecl run dig
comp mergecl merge --method magm
comp mergecl export RUN --method ind_ft+mag
comp mergecl list ru
comp mergecl run --dry
comp mergecl completion z
"""
    done = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "list",
        "run report",
        "digits",
        "magmax",
        "ind_ft+magmax",
        "rules",
        "--dry-run",
        "zsh",
    ]
    assert main(["completion", "zsh"]) == 0
    assert "bashcompinit" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed here (the bash test still runs)")
def test_the_zsh_completion_parses_loads_in_a_bare_zsh_and_completes(tmp_path, capsys):
    assert main(["completion", "zsh"]) == 0
    (tmp_path / "mergecl.zsh").write_text(capsys.readouterr().out)
    assert subprocess.run(["zsh", "-n", "mergecl.zsh"], cwd=tmp_path).returncode == 0  # it parses
    # zsh -f reads no zshrc, so no compinit ran: the script loads it (bashcompinit needs its compdef)
    probe = """source ./mergecl.zsh || exit 3
print -r -- "${_comps[mergecl]}"
setopt ksharrays  # as zsh's _bash_complete calls a bash completion function: arrays from 0
comp() {
    COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=(); _mergecl; print -r -- "${COMPREPLY[*]}"
}
comp mergecl li
comp mergecl --plugin x.py r
comp mergecl run dig
comp mergecl merge --method magm
comp mergecl export RUN --method ind_ft+mag
comp mergecl list ru
comp mergecl run --dry
comp mergecl completion z
"""
    env = dict(os.environ, HOME=str(tmp_path))  # compinit writes its ~/.zcompdump here
    done = subprocess.run(["zsh", "-f", "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    registered, *replies = done.stdout.splitlines()
    assert "_mergecl" in registered  # `complete -F _mergecl mergecl` became a zsh completion
    # zsh's compgen hands every candidate to zsh, whose completion matches them against the word typed
    words = [line.split()[-1] for line in probe.splitlines() if line.startswith("comp mergecl")]
    matched = [
        " ".join(w for w in reply.split() if w.startswith(word)) for reply, word in zip(replies, words, strict=True)
    ]
    assert matched == ["list", "run report", "digits", "magmax", "ind_ft+magmax", "rules", "--dry-run", "zsh"]


def test_run_help_says_what_the_default_runs_and_the_time_the_readme_measured(capsys):
    with pytest.raises(SystemExit) as done:
        main(["run", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    minutes, seconds = map(int, re.search(r"`mergecl run` (\d+) min (\d+) s", readme).groups())
    assert DEFAULT_RUN_TIME == f"about {round(minutes + seconds / 60, 1):g} minutes on 2 CPU cores"
    default = load_config(None)
    assert DEFAULT_RUN_TIME in text and f"{len(default.seeds)} seeds" in text
    assert f"methods {', '.join(default.methods)};" in text
    assert "seconds-long smoke run" in text and "seconds-long smoke run" in readme
    assert "mergecl list" in text and "mergecl completion" in text


def test_dry_run_counts_final_only_trainings_and_validation_passes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "auto.yaml").write_text(
        "seeds: [0, 4]\ndata: {source: digits, n_tasks: 3}\nmodel: {name: mlp, in_dim: 64}\neval_val: true\n"
        "methods: [seq_ft, magmax, joint]\n"
        "method_options: {magmax: {lam: auto, lam_grid: [0.3, 0.5]}, joint: {final_only: true}}\n"
    )
    assert main(["run", "auto.yaml", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.yaml"]
    config = load_config(tmp_path / "auto.yaml")
    tasks = run_scenario(config, 0).tasks
    batch, epochs = config.train.batch_size, config.train.epochs
    once = math.ceil(epochs * math.ceil(sum(len(t.train) for t in tasks) / batch))
    assert f"  joint        -> joint (once, on all tasks at the last step: {once} steps per seed)" in plan
    tests = 2 * 3 * 3 + 3  # seq_ft and magmax: 3 steps x 3 tasks; joint: its last step only
    assert f"evaluations: {tests} per seed, {2 * tests} in all" in plan and "3 merges per seed" in plan
    assert f"and {tests + 2 * (1 + 2 + 3)} per seed on validation splits" in plan  # eval_val + 2 lams x seen tasks
