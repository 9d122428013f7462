"""Merge passes in forked worker processes (engine.FORK_FROM, forked.py): the same bits as one
thread, the errors of one thread, and never a process left behind or a half-written output."""

import os
import signal
import sys

import pytest
import torch
from safetensors.torch import load_file

from mergecl import MergeclError, merge
from mergecl.merging import checkpoints, engine, forked
from mergecl.merging.engine import RNG_BLOCK

from .test_merging_engine import assert_same, make_models, save_all

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked merges are Linux only")


@pytest.fixture(autouse=True)
def _no_cuda_yet():
    if torch.cuda.is_initialized():  # an earlier test used the GPU: this process no longer forks
        pytest.skip("CUDA is initialized in this process: merges stay in threads")


@pytest.fixture
def forking(monkeypatch):
    """Every merge pass forks, however small; yields the list of the passes that did."""
    calls = []
    original = forked.forked_map

    def spy(*args, **kwargs):
        calls.append(args[3])  # workers
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "FORK_FROM", 0)
    monkeypatch.setattr(engine, "forked_map", spy)
    return calls


def no_children_left():
    try:
        os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


def models(dtype=torch.float32):
    base, fts = make_models(t=4, dtype=dtype)
    base["enc.big2"] = torch.randn(RNG_BLOCK * 3 + 5).to(dtype)
    for i, ft in enumerate(fts):
        noise = torch.randn(RNG_BLOCK * 3 + 5, generator=torch.Generator().manual_seed(i))
        ft["enc.big2"] = (base["enc.big2"].float() + 0.1 * noise).to(dtype)
    return base, fts


@pytest.mark.parametrize(
    "method, options",
    [
        ("average", {}),
        ("task_arithmetic", {"dare": 0.2}),
        ("magmax", {"exclude": "head"}),
        ("random_mix", {"dare": 0.2}),
        ("one_over_t", {}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_forked_merge_equals_the_sequential_one_bit_for_bit(tmp_path, forking, method, options, dtype):
    base, fts = models(dtype)
    base_path, ft_paths = save_all(tmp_path, base, fts)
    sequential = merge(base_path, ft_paths, method, seed=3, chunk_size=RNG_BLOCK, workers=1, **options)
    assert forking == []  # one worker: nothing to fork
    out = tmp_path / "forked.safetensors"
    merge(base_path, ft_paths, method, seed=3, chunk_size=RNG_BLOCK, workers=3, out=out, **options)
    assert forking == [3]
    assert_same(sequential, load_file(str(out)))
    from_memory = tmp_path / "from_memory.safetensors"  # state dicts in, a file out
    merge(base, fts, method, seed=3, chunk_size=RNG_BLOCK, workers=2, out=from_memory, **options)
    assert forking == [3, 2]
    assert_same(sequential, load_file(str(from_memory)))
    in_memory = merge(base, fts, method, seed=3, chunk_size=RNG_BLOCK, workers=2, **options)
    assert forking == [3, 2]  # a result collected in memory: threads (no copy-on-write of its pages)
    assert_same(sequential, in_memory)
    assert no_children_left()


def test_chunks_are_computed_in_other_processes_that_report_their_reads(tmp_path, forking, monkeypatch):
    seen = tmp_path / "pids"
    original = engine._Merge._chunk

    def chunk(self, *args):
        with open(seen, "a") as log:
            log.write(f"{os.getpid()}\n")
        return original(self, *args)

    reads = []

    class Bar:
        def update(self, n=1):
            reads.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(engine._Merge, "_chunk", chunk)
    monkeypatch.setattr(engine, "progress_bar", lambda total, *a, **k: reads.append(("total", total)) or Bar())
    base, fts = models()
    merge(base, fts, "average", chunk_size=RNG_BLOCK, workers=1, out=tmp_path / "one.safetensors")
    assert {int(line) for line in seen.read_text().split()} == {os.getpid()}
    (_, total), *updates = reads
    assert sum(updates) > 0.99 * total
    seen.unlink()
    reads.clear()
    merge(base, fts, "average", chunk_size=RNG_BLOCK, workers=2, out=tmp_path / "two.safetensors")
    pids = {int(line) for line in seen.read_text().split()}
    assert pids and os.getpid() not in pids  # (whichever worker is free takes the next chunk)
    assert reads[0] == ("total", total) and sum(reads[1:]) == sum(updates)  # the workers' reads reached the bar


def test_a_non_finite_input_in_a_forked_merge_is_the_same_error_and_writes_nothing(tmp_path, forking):
    base, fts = models()
    fts[2]["enc.big2"][RNG_BLOCK + 7] = float("nan")
    base_path, ft_paths = save_all(tmp_path, base, fts)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeclError, match=r"ft2.safetensors: tensor 'enc.big2' has NaN/Inf values"):
        merge(base_path, ft_paths, "magmax", out=out, chunk_size=RNG_BLOCK, workers=2)
    assert forking == [2]
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))
    assert no_children_left()


def test_a_killed_worker_is_an_error_not_a_hang_and_writes_nothing(tmp_path, forking, monkeypatch):
    parent = os.getpid()
    original = engine._Merge._chunk

    def chunk(self, lam, entry, start, stop, extra):
        if os.getpid() != parent and entry.key == "enc.big2" and start > 0:
            os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
        return original(self, lam, entry, start, stop, extra)

    monkeypatch.setattr(engine._Merge, "_chunk", chunk)
    monkeypatch.setattr(forked, "POLL_S", 0.05)
    base, fts = models()
    base_path, ft_paths = save_all(tmp_path, base, fts)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(forked.WorkerDied, match="ended unexpectedly"):
        merge(base_path, ft_paths, "average", out=out, chunk_size=RNG_BLOCK, workers=2)
    assert not out.exists() and not list(tmp_path.glob("*.tmp*"))
    assert no_children_left()


def test_a_pass_abandoned_by_its_writer_leaves_no_process_and_no_output(tmp_path, forking, monkeypatch):
    def full_disk(self, nbytes):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints.WriteBehind, "wrote", full_disk)
    base, fts = models()
    base_path, ft_paths = save_all(tmp_path, base, fts)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(OSError, match="No space left"):
        merge(base_path, ft_paths, "average", out=out, chunk_size=RNG_BLOCK, workers=2)
    assert forking == [2]
    assert not out.exists() and no_children_left()


def test_small_merges_in_memory_results_and_per_tensor_arguments_stay_in_threads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(engine, "forked_map", lambda *a, **k: calls.append(a) or forked.forked_map(*a, **k))
    base, fts = models()
    out = tmp_path / "merged.safetensors"
    merge(base, fts, "average", workers=2, out=out)  # ~3 MB read: below FORK_FROM
    assert calls == []
    monkeypatch.setattr(engine, "FORK_FROM", 0)
    merge(base, fts, "ties", workers=2, out=out, force=True)  # its thresholds come with each tensor, from here
    assert calls == []
    merge(base, fts, "average", workers=2)  # collected in this process's memory
    assert calls == []
    merge(base, fts, "average", workers=2, out=out, force=True)
    assert len(calls) == 1
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # a child could not read CUDA tensors
    merge(base, fts, "average", workers=2, out=out, force=True)
    assert len(calls) == 1


def test_a_host_program_that_ignores_its_children_still_gets_its_merge(tmp_path, forking, monkeypatch):
    """With SIGCHLD ignored the kernel reaps the workers itself: waiting on them finds none."""
    monkeypatch.setattr(forked, "POLL_S", 0.05)
    previous = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        base, fts = models()
        merge(base, fts, "magmax", chunk_size=RNG_BLOCK, workers=2, out=tmp_path / "merged.safetensors")
    finally:
        signal.signal(signal.SIGCHLD, previous)
    assert forking == [2]
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert_same(merged, merge(base, fts, "magmax", chunk_size=RNG_BLOCK, workers=1))
