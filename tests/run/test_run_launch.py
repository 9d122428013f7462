"""``--nproc N`` (launch.py): N processes of one group, and one answer when they fail: each distinct
error line once, the first failed process's exit status, the other processes stopped, and never
torchrun's agent traceback."""

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from mergecl.launch import launch

ENV = dict(os.environ, MERGECL_QUIET="1", OMP_NUM_THREADS="1")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", "import os, sys, time\nfrom mergecl.launch import say\n" + code]


def test_the_processes_get_their_ranks_and_one_store(tmp_path, capfd):
    code = f"open(os.path.join({str(tmp_path)!r}, os.environ['RANK']), 'w').write(repr(dict(os.environ)))"
    assert launch(python(code), 3, ENV) == 0
    seen = [eval((tmp_path / str(rank)).read_text()) for rank in range(3)]  # noqa: S307 (our own repr)
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in seen] == [(str(r), str(r), "3") for r in range(3)]
    assert len({e["MERGECL_LAUNCH_STORE"] for e in seen}) == 1 and seen[0]["OMP_NUM_THREADS"] == "1"
    assert capfd.readouterr().err == ""


def test_one_failed_process_stops_the_others_and_its_error_is_said_once(capfd):
    code = "if os.environ['RANK'] == '1':\n    say('mergecl: error: rank 1 broke'); sys.exit(2)\ntime.sleep(60)"
    started = time.monotonic()
    assert launch(python(code), 3, ENV) == 2
    assert time.monotonic() - started < 20  # ranks 0 and 2 were stopped, not waited for
    assert capfd.readouterr().err == "mergecl: error: rank 1 broke\n"


def test_the_same_error_of_every_process_is_one_line(capfd):
    assert launch(python("say('mergecl: error: bad.yaml: unknown key'); sys.exit(2)"), 2, ENV) == 2
    assert capfd.readouterr().err == "mergecl: error: bad.yaml: unknown key\n"


def test_a_process_ended_by_a_signal_is_named(capfd):
    code = "import signal\nif os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(60)"
    assert launch(python(code), 2, ENV) == 128 + 9
    assert capfd.readouterr().err == "mergecl: error: the process of rank 1 was ended by SIGKILL\n"


def test_of_crashes_only_the_first_traceback_is_printed(capfd):
    # rank 1 crashes; rank 0 then fails in what would be its next collective: collateral
    code = (
        "from mergecl.launch import hand_over\n"
        "rank = os.environ['RANK']\n"
        "time.sleep(0.0 if rank == '1' else 0.6)\n"
        "hand_over(f'Traceback (most recent call last):\\nRuntimeError: crash of rank {rank}\\n'); sys.exit(1)"
    )
    assert launch(python(code), 2, ENV) == 1
    assert capfd.readouterr().err == "Traceback (most recent call last):\nRuntimeError: crash of rank 1\n"


def test_a_process_a_signal_ended_is_the_cause_not_the_crashes_it_caused(capfd):
    code = (
        "import signal\nfrom mergecl.launch import hand_over\n"
        "if os.environ['RANK'] == '1':\n    os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(0.2)\n"
        "hand_over('Traceback (most recent call last):\\nRuntimeError: Connection closed by peer\\n'); sys.exit(1)"
    )
    assert launch(python(code), 2, ENV) == 128 + 9
    assert capfd.readouterr().err == "mergecl: error: the process of rank 1 was ended by SIGKILL\n"


def test_a_launched_process_hands_its_crash_over_instead_of_printing_it(tmp_path, monkeypatch, capsys):
    from mergecl import cli

    def crash(args):
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "_run_list", crash)
    monkeypatch.setenv("MERGECL_LAUNCH_ERRORS", str(tmp_path))
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["list"]) == 1
    assert capsys.readouterr().err == ""
    handed = (tmp_path / "rank1.traceback").read_text()
    assert handed.startswith("Traceback (most recent call last):") and handed.endswith("RuntimeError: boom\n")
    monkeypatch.delenv("MERGECL_LAUNCH_ERRORS")
    with pytest.raises(RuntimeError, match="boom"):  # not launched: Python's own traceback
        cli.main(["list"])


def mergecl(*args, cwd) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mergecl", *map(str, args)]
    return subprocess.run(command, env=ENV, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_a_config_error_under_nproc_is_one_line(tmp_path):
    config = {"seeds": [0], "data": {"source": "digits", "n_tasks": 2}, "train": {"epoch": 1}}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    done = mergecl("run", "bad.yaml", "--out", "run", "--nproc", 2, cwd=tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == "mergecl: error: bad.yaml: unknown key 'train.epoch'\n"
    assert not (tmp_path / "run").exists()


def test_a_failed_method_under_nproc_exits_1_with_the_table(tmp_path):
    # LwF's distillation weight 1e38 overflows its loss at task 2 (as in test_run_failures.py)
    config = {
        "seeds": [0],
        "data": {"source": "digits", "n_tasks": 2},
        "model": {"name": "mlp", "in_dim": 64, "hidden": [16]},
        "train": {"epochs": 1, "batch_size": 32},
        "methods": ["seq_ft", "lwf"],
        "method_options": {"lwf": {"lam": 1e38}},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    done = mergecl("run", "c.yaml", "--out", "run", "--nproc", 2, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr and "torchrun" not in done.stderr and "Warning" not in done.stderr
    assert done.stderr.count("failed: lwf, seed 0, task 2: training loss became nan") == 1
    assert "not clean: 1 of 2 methods failed" in done.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["methods"]["seq_ft"]["final_acc"] > 20 and "failed" in results["methods"]["lwf"]


@pytest.mark.parametrize("nproc", [0, -1])
def test_nproc_must_be_positive(tmp_path, nproc):
    done = mergecl("run", "digits", "--nproc", nproc, cwd=tmp_path)
    expected = f"mergecl: error: --nproc: expected a positive number of processes, got {nproc}\n"
    assert (done.returncode, done.stderr) == (2, expected)


def test_a_killed_launchers_errors_folder_is_removed_by_the_next_launch(tmp_path, monkeypatch, capfd):
    """SIGKILL leaves a launcher no time to tidy: the next launch removes such folders, but only this
    user's, of a launcher that no longer runs, holding only what processes leave."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    killed = tmp_path / f"mergecl-launch-{dead}-abc"
    running = tmp_path / f"mergecl-launch-{os.getpid()}-def"
    foreign = tmp_path / f"mergecl-launch-{dead}-ghi"
    for folder in (killed, running, foreign):
        folder.mkdir()
        (folder / "rank0").write_text("mergecl: error: x\n")
    (killed / "rank1.traceback").write_text("Traceback ...\n")
    (foreign / "notes.txt").write_text("not a launch's\n")
    assert launch(python("sys.exit(0)"), 1, ENV) == 0
    assert not killed.exists() and running.exists() and (foreign / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([running.name, foreign.name])  # its own is gone too
