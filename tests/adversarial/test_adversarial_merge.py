"""`mergecl merge` outputs never destroy what mergecl did not create, a replaced output survives a
kill at any step, and operating-system failures are one line with nothing half-written (issue 12).

Real safetensors files and directories throughout; faults are injected at the os level (a write, an
fsync, a rename, a temp file that cannot be made) and kills are real: a forked child that dies
(``os._exit``, no clean-up of any kind) just before its N-th file-system step, for every N.
"""

import contextlib
import errno
import fcntl
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl import MergeclError, atomic, merge
from mergecl.cli import main
from mergecl.merging import checkpoints
from mergecl.merging.engine import merge_checkpoints

OLD_LAM, NEW_LAM = 0.5, 0.25


@pytest.fixture
def inputs(tmp_path):
    """A base and two fine-tuned checkpoints in tmp/in, their in-memory states, an empty tmp/out."""
    g = torch.Generator().manual_seed(0)
    base = {"a.w": torch.randn(64, 32, generator=g), "a.b": torch.randn(32, generator=g), "n": torch.arange(3)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}]
    fts.append({k: v * 1.5 for k, v in fts[0].items()})
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    paths = [tmp_path / "in" / name for name in ("base.safetensors", "ft0.safetensors", "ft1.safetensors")]
    for path, state in zip(paths, [base, *fts], strict=True):
        save_file(state, str(path))
    return {"base": paths[0], "fts": paths[1:], "states": (base, fts), "out": tmp_path / "out"}


def cli(*args):
    """main() in this process: (exit status, stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(list(map(str, args)))
    return code, err.getvalue().splitlines()


def cli_merge(inputs, out, *extra):
    return cli("merge", "--method", "magmax", "--base", inputs["base"], "-o", out, "--quiet", *extra, *inputs["fts"])


def one_line_error(code, lines, *fragments):
    assert code == 2 and len(lines) == 1 and lines[0].startswith("mergecl: error: "), (code, lines)
    for fragment in fragments:
        assert fragment in lines[0], lines
    return lines[0]


def expected(inputs, lam):
    base, fts = inputs["states"]
    return merge(base, fts, "magmax", lam=lam)


def load_output(path: Path) -> dict:
    """Every tensor of a merge output (a file, or a directory whose marker lists exactly its files)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    marker = json.loads((path / checkpoints.MARKER_FILE).read_text())
    assert sorted(marker["files"] + [checkpoints.MARKER_FILE]) == sorted(os.listdir(path))
    state = {}
    for name in marker["files"]:
        if name.endswith(".safetensors"):
            state.update(load_file(str(path / name)))
    return state


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def snapshot(directory: Path) -> dict:
    """Every file under ``directory`` with its bytes (symbolic links as their target)."""
    files = {}
    for root, dirs, names in os.walk(directory):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            path = Path(root, name)
            files[str(path.relative_to(directory))] = os.readlink(path) if path.is_symlink() else path.read_bytes()
    return files


def hidden(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("."))


# --- outputs never destroy what mergecl did not create -------------------------------------------


def test_an_existing_foreign_directory_is_refused_even_with_force(inputs):
    notes = inputs["out"] / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    (notes / "model.safetensors").write_bytes(inputs["base"].read_bytes())  # looks like a model, is not ours
    before = snapshot(inputs["out"])
    for extra in ((), ("--force",)):
        one_line_error(*cli_merge(inputs, notes, *extra), f"{notes}: exists and is not an output of mergecl")
    assert snapshot(inputs["out"]) == before


@pytest.mark.parametrize("name", ["m.safetensors", "m"])
def test_an_existing_foreign_file_is_refused_even_with_force(inputs, name):
    out = inputs["out"] / name
    save_file({"w": torch.ones(2)}, str(out))  # a valid checkpoint, but not written by mergecl
    before = out.read_bytes()
    for extra in ((), ("--force",)):
        one_line_error(*cli_merge(inputs, out, *extra), f"{out}: exists and is not")
    assert out.read_bytes() == before and hidden(inputs["out"]) == []


@pytest.mark.parametrize("name", ["merged.safetensors", "merged"])
def test_force_replaces_an_earlier_mergecl_output_and_nothing_else(inputs, name):
    out = inputs["out"] / name
    assert cli_merge(inputs, out, "--lam", OLD_LAM) == (0, [])
    assert same(load_output(out), expected(inputs, OLD_LAM))
    one_line_error(*cli_merge(inputs, out, "--lam", NEW_LAM), "exists (an earlier mergecl output); pass --force")
    assert same(load_output(out), expected(inputs, OLD_LAM))
    assert cli_merge(inputs, out, "--lam", NEW_LAM, "--force") == (0, [])
    assert same(load_output(out), expected(inputs, NEW_LAM))
    assert sorted(os.listdir(inputs["out"])) == [name]  # no temp file, no backup left
    if name == "merged":  # a file the user put into an earlier output makes it theirs
        (out / "notes.txt").write_text("mine")
        one_line_error(*cli_merge(inputs, out, "--force"), "is not an output of mergecl")
        assert (out / "notes.txt").read_text() == "mine"


def test_an_empty_directory_is_used_without_force(inputs):
    out = inputs["out"] / "empty"
    out.mkdir()
    assert cli_merge(inputs, out) == (0, [])
    assert same(load_output(out), expected(inputs, None))


def test_a_sharded_output_is_replaced_whole(inputs):
    out = inputs["out"] / "sharded"
    assert cli_merge(inputs, out, "--max-shard-size", "4KB") == (0, [])
    assert len(os.listdir(out)) > 3  # shards, the index and the marker
    assert cli_merge(inputs, out, "--force", "--lam", NEW_LAM) == (0, [])  # now one shard
    assert sorted(os.listdir(out)) == [checkpoints.MARKER_FILE, "README.md", "model.safetensors"]  # + the model card
    assert same(load_output(out), expected(inputs, NEW_LAM))


def input_cases(inputs):
    """(the output path, what it is) for outputs that are, lie inside or contain an input."""
    root = inputs["base"].parent.parent
    hf = root / "hf"  # a Hugging Face style input directory with more than the weights
    hf.mkdir()
    shutil.copy(inputs["fts"][0], hf / "model.safetensors")
    (hf / "config.json").write_text("{}")
    (root / "alias").symlink_to(root / "in")
    os.link(inputs["fts"][0], root / "hardlink.safetensors")
    return hf, [
        (inputs["base"], "the base"),
        (inputs["fts"][0], "a fine-tuned file"),
        (root / "alias" / "ft0.safetensors", "a fine-tuned file through a symbolic link"),
        (root / "hardlink.safetensors", "a hard link to a fine-tuned file"),
        (hf, "an input directory"),
        (hf / "merged", "a directory inside an input directory"),
        (hf / "merged.safetensors", "a file inside an input directory"),
        (root / "in", "the directory holding the inputs"),
        (root, "a directory containing the inputs"),
    ]


def test_an_output_that_is_in_or_contains_an_input_is_refused_even_with_force(inputs):
    hf, cases = input_cases(inputs)
    root = inputs["base"].parent.parent
    before = snapshot(root)
    fts = [inputs["fts"][0], hf]
    for out, what in cases:
        for extra in ((), ("--force",)):
            args = ("merge", "--method", "average", "--base", inputs["base"], "-o", out, *extra, *fts)
            message = one_line_error(*cli(*args), f"{out}: the output would be, lie inside or contain the input")
            assert message, what
    assert snapshot(root) == before  # every input, byte for byte, and nothing new


def test_fisher_inputs_are_inputs_too(inputs):
    fisher = inputs["out"] / "fisher.safetensors"
    save_file({k: torch.ones(v.shape) for k, v in inputs["states"][0].items() if v.is_floating_point()}, str(fisher))
    before = fisher.read_bytes()
    with pytest.raises(MergeclError, match="would be, lie inside or contain the input"):
        merge_checkpoints(inputs["base"], inputs["fts"][:1], "fisher", fisher=[fisher], out=fisher, force=True)
    assert fisher.read_bytes() == before


@pytest.mark.parametrize("spelling", [".", "absolute", ".."])
def test_the_current_directory_is_never_an_output(inputs, monkeypatch, spelling):
    cwd = inputs["out"] / "work"
    cwd.mkdir()
    (cwd / "notes.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    out = {"absolute": str(cwd), ".": ".", "..": ".."}[spelling]
    before = snapshot(inputs["out"])
    for extra in ((), ("--force",)):
        one_line_error(*cli_merge(inputs, out, *extra), "the output would be or contain the current directory")
    assert snapshot(inputs["out"]) == before
    # even an empty current directory is not replaced (it would vanish under the shell's feet)
    (cwd / "notes.txt").unlink()
    one_line_error(*cli_merge(inputs, "."), "current directory")
    assert cwd.is_dir() and os.listdir(cwd) == []


def test_a_symbolic_link_output_is_refused(inputs):
    target = inputs["out"] / "real.safetensors"
    assert cli_merge(inputs, target) == (0, [])
    link = inputs["out"] / "link.safetensors"
    link.symlink_to(target)
    one_line_error(*cli_merge(inputs, link, "--force"), f"{link}: the output is a symbolic link")
    assert link.is_symlink() and same(load_output(target), expected(inputs, None))


# --- replacing an output survives a kill at any step ---------------------------------------------

STEPS = ("replace", "rmtree", "exchange")


def killed_at(step: int, work, exchange: bool) -> bool:
    """Run ``work`` in a forked child that dies just before its ``step``-th rename, exchange or tree
    removal (os._exit: no except or finally clause runs, as under SIGKILL); True if it died."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            calls = [0]

            def dying(original):
                def step_then_maybe_die(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == step:
                        os._exit(137)
                    return original(*args, **kwargs)

                return step_then_maybe_die

            os.replace = dying(os.replace)
            shutil.rmtree = dying(shutil.rmtree)
            atomic._exchange = dying(atomic._exchange if exchange else lambda a, b: False)
            work()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    assert code in (0, 137), f"the child failed at step {step} (status {code})"
    return code == 137


def age(directory: Path) -> None:
    """Make every hidden entry look like a killed writer's old leftover."""
    for name in hidden(directory):
        os.utime(directory / name, (time.time() - 3600, time.time() - 3600), follow_symlinks=False)


@pytest.mark.parametrize(
    "name, exchange",
    [("merged", True), ("merged", False), ("merged.safetensors", True)],
    ids=["directory-atomic-exchange", "directory-two-renames", "file"],
)
def test_replacing_an_output_survives_a_kill_at_every_step(inputs, name, exchange):
    out = inputs["out"] / name
    old, new = expected(inputs, OLD_LAM), expected(inputs, NEW_LAM)
    shard = ("--max-shard-size", "4KB") if name == "merged" else ()
    assert cli_merge(inputs, out, "--lam", OLD_LAM, *shard) == (0, [])

    def replace():
        merge_checkpoints(
            inputs["base"], inputs["fts"], "magmax", out=out, force=True, lam=NEW_LAM, max_shard_size="4KB"
        )

    outcomes = []
    step = 1
    while killed_at(step, replace, exchange):
        if exchange or name.endswith(".safetensors"):
            state = load_output(out)  # at every instant, without any recovery
        else:  # two renames: the old directory is in the output's place or under the backup name
            backup = out.with_name(f".{out.name}{atomic.BACKUP_SUFFIX}")
            state = load_output(out if out.exists() else backup)
            atomic.recover(out)  # what the next merge does first
            assert same(load_output(out), state)
        assert same(state, old) or same(state, new), f"killed before step {step}: the output is neither"
        outcomes.append("new" if same(state, new) else "old")
        # the next merge puts things in order: the new output in place, no temp file, no backup
        age(inputs["out"])
        assert cli_merge(inputs, out, "--lam", OLD_LAM, "--force", *shard) == (0, [])
        assert same(load_output(out), old) and hidden(inputs["out"]) == []
        step += 1
    assert "old" in outcomes, outcomes  # a kill before the swap was tried
    if name == "merged":
        assert "new" in outcomes, outcomes  # and one after it, before the old directory was gone
    assert same(load_output(out), new) and hidden(inputs["out"]) == []  # the run that was not killed


# --- stale temp files ----------------------------------------------------------------------------


def test_a_killed_merges_temp_file_is_removed_by_the_next_merge(inputs):
    out = inputs["out"] / "m.safetensors"

    def write():
        merge_checkpoints(inputs["base"], inputs["fts"], "magmax", out=out)

    assert killed_at(1, write, exchange=True)  # died with the whole output in its temp file
    (temp,) = hidden(inputs["out"])
    assert temp.startswith(".m.safetensors.") and temp.endswith(".tmp") and not out.exists()
    assert cli_merge(inputs, out) == (0, [])  # a fresh temp may be a live writer's: kept for now
    assert hidden(inputs["out"]) == [temp]
    age(inputs["out"])
    assert cli_merge(inputs, out, "--force") == (0, [])
    assert hidden(inputs["out"]) == []


def test_stale_temp_clean_up_spares_live_writers_and_everything_else(inputs):
    out = inputs["out"]
    target = out / "m.safetensors"
    stale = [".m.safetensors.abcd1234.tmp", ".m.safetensors.ABCD_xyz.tmp"]
    spared = [
        ".m.safetensors.lock1234.tmp",  # locked by this process (another open file description)
        ".m.safetensors.proc1234.tmp",  # locked by another process
        ".m.safetensors.tmp",  # not the writer's pattern
        ".m.safetensors.abc.tmp",
        ".m.safetensors.x.abcd1234.tmp",  # the temp of another output, m.safetensors.x
        ".other.safetensors.abcd1234.tmp",
        "m.safetensors.abcd1234.tmp",
        ".m.safetensors.abcd1234.tmp.keep",
    ]
    for name in stale + spared:
        (out / name).write_bytes(b"x")
    (out / ".m.safetensors.dir12345.tmp").mkdir()  # a directory temp is removed whole
    (out / ".m.safetensors.dir12345.tmp" / "shard").write_bytes(b"x")
    stale.append(".m.safetensors.dir12345.tmp")
    victim = out / "victim"
    victim.write_text("not a temp")
    (out / ".m.safetensors.link1234.tmp").symlink_to(victim)  # a link is never followed or removed
    spared.append(".m.safetensors.link1234.tmp")
    age(out)
    (out / ".m.safetensors.new12345.tmp").write_bytes(b"x")  # unlocked but fresh: maybe just created
    spared.append(".m.safetensors.new12345.tmp")

    held = os.open(out / ".m.safetensors.lock1234.tmp", os.O_RDONLY)
    fcntl.flock(held, fcntl.LOCK_EX)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(60)",
            str(out / ".m.safetensors.proc1234.tmp"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        removed = atomic.remove_stale_temps(target)
    finally:
        holder.kill()
        holder.wait()
        os.close(held)
    assert sorted(p.name for p in removed) == sorted(stale)
    assert sorted(os.listdir(out)) == sorted([*spared, "victim"]) and victim.read_text() == "not a temp"


# --- operating-system failures are one line ------------------------------------------------------


class Faulty:
    """A file whose writes fail with ``fault`` once ``limit`` bytes went through."""

    def __init__(self, handle, fault: BaseException, limit: int) -> None:
        self._handle, self._fault, self._left = handle, fault, limit

    def write(self, data) -> int:
        self._left -= len(data)
        if self._left < 0:
            raise self._fault
        return self._handle.write(data)


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def inject(monkeypatch, where: str, fault: BaseException) -> None:
    if where == "write":  # a full disk halfway through the tensors
        real = checkpoints._write_stream
        monkeypatch.setattr(
            checkpoints, "_write_stream", lambda handle, *args: real(Faulty(handle, fault, 5000), *args)
        )
    elif where == "fsync":  # delayed allocation: the disk is found full at fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(fault))
    elif where == "temp":  # a read-only or forbidden output location

        def refuse(*args, dir=None, **kwargs):
            raise fault

        monkeypatch.setattr("tempfile.mkstemp", refuse)
        monkeypatch.setattr("tempfile.mkdtemp", refuse)
    elif where == "rename":  # the last step is refused
        monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(fault))
        monkeypatch.setattr(atomic, "_exchange", lambda *args: (_ for _ in ()).throw(fault))


FAULTS = [
    ("write", enospc(), "No space left on device"),
    ("fsync", enospc(), "No space left on device"),
    ("fsync", OSError(errno.EIO, os.strerror(errno.EIO)), "Input/output error"),
    ("temp", OSError(errno.EROFS, os.strerror(errno.EROFS), "/out/.m.tmp"), "/out/.m.tmp: Read-only file system"),
    ("temp", PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/out"), "/out: Permission denied"),
    ("rename", PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/out"), "/out: Permission denied"),
    ("write", KeyboardInterrupt(), None),
    ("rename", KeyboardInterrupt(), None),
]


@pytest.mark.parametrize(
    "where, fault, words", FAULTS, ids=[f"{w}-{type(f).__name__}-{i}" for i, (w, f, _) in enumerate(FAULTS)]
)
@pytest.mark.parametrize("name", ["m.safetensors", "m"])
def test_an_os_failure_is_one_line_and_the_previous_output_survives(inputs, monkeypatch, where, fault, words, name):
    out = inputs["out"] / name
    assert cli_merge(inputs, out, "--lam", OLD_LAM) == (0, [])
    before = snapshot(inputs["out"])
    inject(monkeypatch, where, fault)
    code, lines = cli_merge(inputs, out, "--force", "--lam", NEW_LAM)
    monkeypatch.undo()
    if words is None:
        assert (code, lines) == (130, ["mergecl: interrupted"])
    else:
        message = one_line_error(code, lines, words)
        if where in ("write", "fsync"):
            assert message.startswith(f"mergecl: error: {out}: ")  # names what was being written
    assert snapshot(inputs["out"]) == before  # the previous output, and no temp file


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_a_really_read_only_directory_is_one_line(inputs):
    out = inputs["out"] / "m.safetensors"
    os.chmod(inputs["out"], 0o555)
    try:
        one_line_error(*cli_merge(inputs, out), "Permission denied")
    finally:
        os.chmod(inputs["out"], 0o755)
    assert os.listdir(inputs["out"]) == []


def test_lam_out_of_range_is_one_line(inputs):
    for lam in ("1e39", "-1e39", "nan", "inf", "-inf"):
        code, lines = cli_merge(inputs, inputs["out"] / "m.safetensors", f"--lam={lam}")
        one_line_error(code, lines, "finite number")
    assert os.listdir(inputs["out"]) == []
    with pytest.raises(MergeclError, match="lam must be a finite number of at most"):
        merge(*inputs["states"], "task_arithmetic", lam=1e39)
