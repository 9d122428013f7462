"""A run directory is owned; configs are bounded; a half-finished report says what it covers;
operating-system failures in `mergecl run` are one line (issue 12).

Real processes, real locks, real files: a second process on a running run, a directory that is not
a run, foreign temp files, an edited config, a billion laughs, malformed progress files, a run
killed between seeds, Ctrl-C during start-up, directories that cannot be created.
"""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mergecl import MergeclError
from mergecl.cli import main
from mergecl.evaluation.report import format_table
from mergecl.experiment.config import load_config, parse_config
from mergecl.experiment.rundir import LOCK, LOCK_GRACE_S, MARKER, RunDir
from mergecl.experiment.runner import run

TINY = {
    "name": "tiny",
    "seeds": [0],
    "data": {"source": "digits", "scenario": "class", "n_tasks": 2},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [16]},
    "train": {"epochs": 1, "batch_size": 64, "lr": 0.01},
    "methods": ["seq_ft"],
}
QUIET = dict(echo=lambda message: None, report=False)
ENV = dict(os.environ, MERGECL_QUIET="1", OMP_NUM_THREADS="1")


def snapshot(root: Path, live: bool = False) -> dict[str, object]:
    """Every entry under ``root``, hidden ones too: bytes of files, targets of links, dirs as such.

    ``live``: a run is writing under ``root``; its temp files come and go, so they are left out."""
    seen: dict[str, object] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if live and name.endswith(".tmp"):
                continue
            try:
                if path.is_symlink():
                    seen[key] = f"-> {os.readlink(path)}"
                elif path.is_dir():
                    seen[key] = "<dir>"
                else:
                    seen[key] = path.read_bytes()
            except FileNotFoundError:
                if not live:
                    raise
    return seen


def settled_snapshot(root: Path, deadline: float) -> dict[str, object]:
    """A live run's directory once two looks 0.2 s apart agree (its start-up writes are done)."""
    before = snapshot(root, live=True)
    while time.time() < deadline:
        time.sleep(0.2)
        now = snapshot(root, live=True)
        if now == before:
            return now
        before = now
    raise AssertionError(f"{root} kept changing")


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mergecl: error: "), err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished tiny run, made once; tests work on copies (``fresh``)."""
    _, out = run(parse_config(TINY), out=tmp_path_factory.mktemp("template") / "run", **QUIET)
    return out


@pytest.fixture
def fresh(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run", symlinks=True))


def hold_lock(path: Path) -> int:
    """What another process does: its own open file description, flock'ed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


# --- the lock -----------------------------------------------------------------------------------


def test_a_second_process_on_a_running_run_refuses_at_once_and_the_lock_dies_with_its_holder(tmp_path, capsys):
    config = write_yaml(tmp_path / "long.yaml", {**TINY, "train": {**TINY["train"], "epochs": 5000}})
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "mergecl", "run", str(config), "--out", str(out), "--quiet"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while not (out / MARKER).exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert (out / MARKER).exists() and first.poll() is None, "the first run did not start"
        before = settled_snapshot(out, deadline)
        started = time.perf_counter()
        assert main(["run", "--resume", str(out)]) == 2  # this process is the second one
        assert one_error_line(capsys) == (
            f"mergecl: error: {out}: in use by another mergecl process (it holds {LOCK}); wait for it to end\n"
        )
        assert main(["run", str(config), "--out", str(out)]) == 2
        refused = f"mergecl: error: {out}: already holds a run; continue it with --resume {out}\n"
        assert one_error_line(capsys) == refused
        assert time.perf_counter() - started < 5.0 and first.poll() is None, "refused at once, while it runs"
        assert {k: v for k, v in snapshot(out, live=True).items() if k in before} == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    rundir = RunDir(out)  # the kernel dropped the lock with its holder
    rundir.lock()
    rundir.unlock()


def test_the_lock_refuses_after_a_short_grace_and_nothing_is_cleaned_under_another_holder(fresh):
    stale = fresh / ".results.json.k1ll3dxx.tmp"  # another writer's temp, as far as we can know
    stale.write_text("half a write")
    before = snapshot(fresh)
    fd = hold_lock(fresh / LOCK)
    try:
        started = time.perf_counter()
        with pytest.raises(MergeclError, match=f"{fresh}: in use by another mergecl process"):
            run(resume=fresh, **QUIET)
        assert time.perf_counter() - started < LOCK_GRACE_S + 1.0  # a just-killed holder may still be dying
        assert snapshot(fresh) == before
    finally:
        os.close(fd)
    run(resume=fresh, **QUIET)  # released: the resume goes on, and cleans up
    assert not stale.exists()


def test_a_temp_file_held_by_a_live_writer_survives_a_resume(fresh):
    live = fresh / ".report.md.wr1t1ng0.tmp"  # `mergecl report` writing while the run resumes
    live.write_text("being written")
    fd = hold_lock(live)
    try:
        run(resume=fresh, **QUIET)
        assert live.read_text() == "being written"
    finally:
        os.close(fd)


# --- what is a run, and what clean-up may touch --------------------------------------------------


def test_resume_refuses_a_directory_that_is_not_a_run_and_touches_nothing(tmp_path, capsys):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    write_yaml(notes / "config.yaml", TINY)  # a valid config, even
    (notes / ".draft.tmp").write_text("my editor's swap file")
    (notes / "sub" / ".results.json.abcdefgh.tmp").write_text("not mergecl's")
    (notes / "notes.txt").write_text("my notes")
    before = snapshot(notes)
    with pytest.raises(MergeclError, match=f"{notes}: not a mergecl run .*nothing was changed"):
        run(resume=notes, **QUIET)
    assert main(["run", "--resume", str(notes)]) == 2
    one_error_line(capsys)
    assert snapshot(notes) == before  # no lock file either


def test_a_new_run_refuses_a_directory_with_files_and_takes_an_empty_one(tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("my notes")
    (notes / "config.yaml").write_text("mine: true\n")
    before = snapshot(notes)
    with pytest.raises(MergeclError, match=f"{notes}: exists and is not empty"):
        run(parse_config(TINY), out=notes, **QUIET)
    assert main(["run", str(write_yaml(tmp_path / "c.yaml", TINY)), "--out", str(notes)]) == 2
    one_error_line(capsys)
    assert snapshot(notes) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    rundir = RunDir(empty)
    rundir.create(parse_config(TINY))
    rundir.unlock()
    assert rundir.is_run() and load_config(empty / "config.yaml") == parse_config(TINY)


def test_cleanup_deletes_only_temp_files_of_the_runs_own_files(fresh, tmp_path):
    own = [
        fresh / ".results.json.k1ll3dxx.tmp",
        fresh / ".progress.json.abcdefgh.tmp",
        fresh / ".heatmap_seq_ft.png.abcdefgh.tmp",
        fresh / "seed0" / ".base.safetensors.abcdefgh.tmp",
        fresh / "seed0" / "seq" / ".task1.safetensors.abcdefgh.tmp",
        fresh / "seed0" / "seq" / ".state0.safetensors.abcdefgh.tmp",
    ]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / ".task0.safetensors.abcdefgh.tmp").write_text("reached through a link")
    foreign = [
        fresh / ".notes.txt.abcdefgh.tmp",  # not a file of the run
        fresh / ".task0.safetensors.abcdefgh.tmp",  # a run's name, in the wrong place
        fresh / "seed0" / ".results.json.abcdefgh.tmp",
        fresh / "seed0" / "seq" / ".mine.tmp",
        fresh / "mine" / ".results.json.abcdefgh.tmp",
        fresh / "seed0" / "link" / ".task0.safetensors.abcdefgh.tmp",
    ]
    for path in own + foreign[:-1]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("left behind")
    (fresh / "seed0" / "link").symlink_to(outside)
    (fresh / ".progress.json.dirdirdi.tmp").mkdir()  # a directory under a temp name: not ours to delete
    run(resume=fresh, **QUIET)
    assert [path for path in own if path.exists()] == []
    assert [path for path in foreign if not path.exists()] == []
    assert (fresh / ".progress.json.dirdirdi.tmp").is_dir()


# --- the config of a run --------------------------------------------------------------------------


def test_a_resume_with_an_edited_config_is_refused_naming_the_keys(fresh, capsys):
    edited = {**TINY, "model": {**TINY["model"], "hidden": [8]}, "train": {**TINY["train"], "lr": 0.02}}
    write_yaml(fresh / "config.yaml", edited)
    before = snapshot(fresh)
    with pytest.raises(MergeclError, match=r"config.yaml: differs from the config .* in model.hidden, train.lr; "):
        run(resume=fresh, **QUIET)
    assert main(["run", "--resume", str(fresh)]) == 2
    one_error_line(capsys)
    assert snapshot(fresh) == before


def test_seeds_may_be_added_by_hand_or_by_seeds_and_are_recorded(fresh):
    write_yaml(fresh / "config.yaml", {**TINY, "seeds": [0, 1]})  # added by hand: allowed
    rundir = RunDir(fresh)
    assert rundir.open_existing().seeds == [0, 1]
    rundir.unlock()
    assert json.loads((fresh / MARKER).read_text())["config"]["seeds"] == [0, 1]
    assert rundir.open_existing(seeds=[0, 1, 4]).seeds == [0, 1, 4]
    rundir.unlock()
    assert load_config(fresh / "config.yaml").seeds == [0, 1, 4]
    write_yaml(fresh / "config.yaml", {**TINY, "seeds": [0]})  # dropping recorded seeds is a change
    with pytest.raises(MergeclError, match=r"differs from the config the run was started with in seeds;"):
        rundir.open_existing()
    write_yaml(fresh / "config.yaml", {**TINY, "seeds": [0, 1, 4]})
    with pytest.raises(MergeclError, match=r"--seeds: seeds.3: Input should be greater than or equal to 0"):
        RunDir(fresh).open_existing(seeds=[0, 1, 4, -4])


def test_a_run_made_before_the_marker_resumes_and_gets_one(fresh):
    (fresh / MARKER).unlink()
    (fresh / LOCK).unlink()
    results, _ = run(resume=fresh, **QUIET)
    assert results["methods"]["seq_ft"]["coverage"] == {"0": 2}
    assert json.loads((fresh / MARKER).read_text())["config"] == parse_config(TINY).model_dump(mode="json")


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "{}",
        '{"seeds": []}',
        '{"seeds": {"0": []}}',
        '{"seeds": {"zero": {}}}',
        '{"seeds": {"0": {"rows": [], "all_class_acc": {}, "train_time": {}, "method_time": {}}}}',
        '{"seeds": {"0": {"rows": {"seq_ft": [[1, "x"]]}, "all_class_acc": {}, "train_time": {}, "method_time": {}}}}',
        '{"seeds": {"0": {"rows": {}, "all_class_acc": {}, "train_time": {"seq": "1s"}, "method_time": {}}}}',
        "not json",
    ],
)
def test_a_malformed_progress_file_is_one_line_naming_it(fresh, text):
    (fresh / "progress.json").write_text(text)
    before = snapshot(fresh)
    with pytest.raises(MergeclError, match=f"^{fresh / 'progress.json'}: ") as caught:
        run(resume=fresh, **QUIET)
    assert "\n" not in str(caught.value)
    assert snapshot(fresh) == before
    with pytest.raises(MergeclError, match="progress.json"):  # not "in use": the refusal released the lock
        run(resume=fresh, **QUIET)


def test_a_malformed_marker_is_one_line_naming_it(fresh):
    (fresh / MARKER).write_text('{"config": [1]}')
    with pytest.raises(MergeclError, match=f"^{fresh / MARKER}: not a mergecl run marker"):
        run(resume=fresh, **QUIET)


# --- bounded YAML --------------------------------------------------------------------------------


def billion_laughs(levels: int = 9) -> str:
    text = 'model:\n  name: mlp\n  l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    for i in range(1, levels):
        text += f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n"
    return text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (billion_laughs(), "more than 200000 values once its aliases are expanded"),
        ("model: &m {name: mlp, again: *m}\n", "an alias refers to a value that contains it"),
        ("model: " + "[" * 100_000 + "]" * 100_000 + "\n", "(not valid YAML|nested too deeply)"),
        (
            "method_options:\n  magmax:\n" + "".join(f"    k{i}: {i}\n" for i in range(600_000)),
            "larger than 1 MB",
        ),
        ("name: \xff\n".encode("latin-1"), "not UTF-8 text"),
    ],
    ids=["billion-laughs", "recursive-alias", "deep-nesting", "10-MB", "not-utf8"],
)
def test_hostile_yaml_is_refused_in_milliseconds(tmp_path, capsys, text, message):
    path = tmp_path / "hostile.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.perf_counter()
    with pytest.raises(MergeclError, match=f"^{path}: {message}"):
        load_config(path)
    assert time.perf_counter() - started < 0.5
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_aliases_within_bounds_still_work(tmp_path):
    text = "methods: [magmax, ties]\nmethod_options:\n  magmax: &o {lam: 0.5}\n  ties: *o\n"
    config = load_config(write_yaml_text(tmp_path / "ok.yaml", text))
    assert config.method_options == {"magmax": {"lam": 0.5}, "ties": {"lam": 0.5}}


def write_yaml_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- a half-finished run says which seeds and steps its numbers cover ----------------------------


def test_report_of_a_run_killed_between_seeds_says_what_each_number_covers(tmp_path, capsys):
    config = {**TINY, "seeds": [0, 1], "data": {**TINY["data"], "n_tasks": 3}, "train": {**TINY["train"]}}
    config["train"].update(epochs=12, batch_size=32)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergecl", "run", str(write_yaml(tmp_path / "c.yaml", config)), "--out", str(out)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:  # kill once results.json covers a step of seed 1
        methods = RunDir(out).read_json("results.json", {"methods": {}})["methods"]
        if methods.get("seq_ft", {}).get("coverage", {}).get("1", 0) >= 1:
            proc.send_signal(signal.SIGKILL)  # at once: on a fast machine the next step takes ~0.1 s
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"

    progress = json.loads((out / "progress.json").read_text())["seeds"]
    entry = json.loads((out / "results.json").read_text())["methods"]["seq_ft"]
    step = entry["coverage"]["1"]  # 1, or 2 if seed 1's next step committed before the kill landed
    assert entry["coverage"] == {"0": 3, "1": step} and 1 <= step < 3
    last = progress["0"]["rows"]["seq_ft"][-1]
    assert entry["final_acc"] == pytest.approx(sum(last) / 3)  # seed 0 at step 3 alone: never mixed with seed 1's
    assert len(entry["accuracy_matrix"]) == 3

    assert main(["report", str(out)]) == 0
    note = f"seq_ft: the numbers cover seed 0 at step 3/3; not in them: 1 (step {step}/3)"
    assert f"note: {note}" in capsys.readouterr().out
    assert f"- {note}" in (out / "report.md").read_text()
    assert f"0:3 1:{step}" in (out / "results.csv").read_text()


def test_results_written_before_coverage_say_they_average_different_steps():
    seeds = {"0": {"accuracy_matrix": [[90.0, 0.0], [80.0, 70.0]]}, "1": {"accuracy_matrix": [[88.0, 0.0]]}}
    results = {"run": {"num_tasks": 2}, "methods": {"magmax": {"accuracy_matrix": [[89.0, 0.0]], "seeds": seeds}}}
    assert "magmax: the numbers average seeds at different steps: 0 (step 2/2), 1 (step 1/2)" in format_table(results)
    finished = {"run": {"num_tasks": 2}, "methods": {"m": {"final_acc": 1.0, "coverage": {"0": 2, "1": 2}}}}
    assert "note" not in format_table(finished)


# --- operating-system failures and start-up -------------------------------------------------------


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs (no directory can be made there)")
def test_a_directory_that_cannot_be_created_is_one_line(tmp_path, capsys):
    config = write_yaml(tmp_path / "c.yaml", TINY)
    assert main(["run", str(config), "--out", "/sys/kernel/mergecl-run/r"]) == 2
    assert "cannot create the run directory" in one_error_line(capsys)
    assert not Path("/sys/kernel/mergecl-run").exists()
    (tmp_path / "a-file").write_text("in the way")
    assert main(["run", str(config), "--out", str(tmp_path / "a-file" / "r")]) == 2
    assert "Not a directory" in one_error_line(capsys)
    assert main(["run", str(config), "--out", str(tmp_path / "a-file")]) == 2
    assert "exists and is not a directory" in one_error_line(capsys)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_a_read_only_location_is_one_line(tmp_path, capsys):
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["run", str(write_yaml(tmp_path / "c.yaml", TINY)), "--out", str(locked / "r")]) == 2
        assert "Permission denied" in one_error_line(capsys)
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_a_failure_while_the_run_directory_is_made_leaves_nothing(tmp_path, monkeypatch):
    import mergecl.experiment.rundir as rundir_module

    def interrupted(config):
        raise KeyboardInterrupt  # Ctrl-C between the marker and config.yaml

    monkeypatch.setattr(rundir_module, "dump_config", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(parse_config(TINY), out=tmp_path / "new", **QUIET)
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(KeyboardInterrupt):
        run(parse_config(TINY), out=tmp_path / "empty", **QUIET)
    assert [p.name for p in (tmp_path / "empty").iterdir()] in ([], [LOCK])


def test_ctrl_c_during_start_up_is_one_line_and_leaves_no_half_run(tmp_path):
    """Ctrl-C while Python imports torch, and once the run directory exists (data, model, first step)."""
    config = write_yaml(tmp_path / "c.yaml", {**TINY, "train": {**TINY["train"], "epochs": 5000}})
    outs = [tmp_path / "early", tmp_path / "late"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mergecl", "run", str(config), "--out", str(out), "--quiet"],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # as from a terminal: a shell's background job (`cmd &`) starts with SIGINT ignored, and
            # mergecl rightly keeps a parent's choice to ignore it
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        for out in outs
    ]
    time.sleep(0.5)
    procs[0].send_signal(signal.SIGINT)
    deadline = time.time() + 60
    while not (outs[1] / "config.yaml").exists() and procs[1].poll() is None and time.time() < deadline:
        time.sleep(0.005)  # made: Ctrl-C now lands in loading data, building the model, the first step
    procs[1].send_signal(signal.SIGINT)
    for proc, out in zip(procs, outs, strict=True):
        _, err = proc.communicate(timeout=60)
        assert proc.returncode in (130, -signal.SIGINT), (out.name, err)
        assert err in ("", "mergecl: interrupted\n"), (out.name, err)  # never a traceback
        assert not out.exists() or RunDir(out).is_run() and (out / "config.yaml").exists(), out.name
    assert (outs[1] / MARKER).exists()  # a run that started is resumable
    assert [p for p in tmp_path.rglob("*.tmp")] == []


def test_negative_seeds_and_missing_devices_are_one_line_before_any_work(tmp_path, capsys):
    assert main(["run", str(write_yaml(tmp_path / "neg.yaml", {**TINY, "seeds": [-1]}))]) == 2
    assert one_error_line(capsys).endswith("seeds.0: Input should be greater than or equal to 0\n")
    with pytest.raises(MergeclError, match="seeds.0: Input should be less than 4294967296"):
        parse_config({**TINY, "seeds": [2**32]})
    with pytest.raises(MergeclError, match=r"device: 'cuda:99', but this torch sees"):
        run(parse_config({**TINY, "device": "cuda:99"}), out=tmp_path / "r", **QUIET)
    assert not (tmp_path / "r").exists()
    if not torch.cuda.is_available():
        config = write_yaml(tmp_path / "cuda.yaml", {**TINY, "device": "cuda"})
        assert main(["run", str(config), "--out", str(tmp_path / "r")]) == 2
        assert "device: 'cuda', but this torch sees no CUDA device" in one_error_line(capsys)
        assert not (tmp_path / "r").exists()


def test_combine_into_a_forbidden_place_is_one_line(fresh, capsys):
    """Every command, not only run and merge: an operating-system failure is one line, exit 2."""
    assert main(["combine", "/sys/kernel/mergecl-combined", str(fresh)]) == 2  # refused even for root
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mergecl: error: ") and "Traceback" not in err
