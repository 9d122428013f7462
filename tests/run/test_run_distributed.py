"""Multi-process runs (torchrun + DDP, gloo on CPU) give the results of one process with the same
global batch, with the optimiser state sharded (ZeRO-1) or not; FSDP2 (shard: full) gives the
numbers of DDP; a killed multi-process run resumes to the same numbers; bf16 autocast (the GPU path,
forced on the CPU) trains every method under DDP with sharded optimiser state.

Tolerance: weights agree to 1e-4 (sums of gradient shares in another order) and accuracies exactly,
except LwF: its distillation gradient at the start of a task is the difference of two nearly equal
distributions, so float rounding of batch-size-dependent kernels grows to ~1e-2 in the weights and
may move a test prediction or two: LwF accuracies agree within 1.5 points.
"""

import fcntl
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # ~2 min of torchrun processes: `pytest -m slow`

CONFIG = {
    "name": "ddp",
    "seeds": [0],
    "device": "cpu",
    "data": {"source": "digits", "scenario": "class", "n_tasks": 3},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [32]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.01},
    "methods": ["seq_ft", "magmax", "ties", "ind_ft+average", "ewc", "lwf", "became", "pam", "joint"],
    "method_options": {"ewc": {"lam": 100.0}, "pam": {"align_every": 2}},
}
EXACT = ["seq_ft", "magmax", "ties", "ind_ft+average", "ewc", "became", "pam", "joint"]


def mergecl(*args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", MERGECL_QUIET="1")
    return subprocess.Popen([sys.executable, "-m", "mergecl", *map(str, args)], env=env, **kwargs)


def finished(*args):
    proc = mergecl(*args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    return out


def metrics(run_dir):
    return json.loads((run_dir / "results.json").read_text())["methods"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    finished("run", root / "config.yaml", "--out", root / "one", "--quiet")
    return root


@pytest.fixture(scope="module")
def ddp(single):
    """CONFIG on 2 processes with DDP: its output and run directory."""
    out = finished("run", single / "config.yaml", "--out", single / "two", "--quiet", "--nproc", 2)
    return out, single / "two"


def assert_same_run(one, two, methods=CONFIG["methods"]):
    a, b = metrics(one), metrics(two)
    for name in set(EXACT) & set(methods):
        for key in ("final_acc", "avg_incremental_acc", "bwt", "all_class_acc"):
            assert a[name][key] == pytest.approx(b[name][key], abs=1e-9), (name, key)
    for key in ("final_acc", "all_class_acc"):
        assert a["lwf"][key] == pytest.approx(b["lwf"][key], abs=1.5)
    assert a["became"]["step_info"]["lambda"] == pytest.approx(b["became"]["step_info"]["lambda"], abs=1e-4)
    streams = {"seq": "seq_ft", "ind": "ind_ft+average", "ewc": "ewc", "became": "became", "pam": "pam"}
    for stream in (stream for stream, method in streams.items() if method in methods):
        for t in range(3):
            x = load_file(one / "seed0" / stream / f"task{t}.safetensors")
            y = load_file(two / "seed0" / stream / f"task{t}.safetensors")
            assert max(float((x[k] - y[k]).abs().max()) for k in x) < 1e-4, (stream, t)


def test_two_processes_match_one(single, ddp):
    out, two = ddp
    assert_same_run(single / "one", two)
    assert "2 process(es)" in json.loads((two / "results.json").read_text())["run"]["machine"]
    assert out.count("run directory:") == 1  # rank 0 alone prints and writes
    assert (two / "report.md").exists()


def test_fully_sharded_weights_give_the_numbers_of_ddp(single, ddp):
    """shard: full trains an FSDP2-sharded copy (per Linear of the MLP, then the root: the head) and
    gathers it after every task: every method that reads the weights outside training (task vectors,
    EWC's and BECAME's Fisher, LwF's teacher, GPM's representations, BECAME's merge) and every hook
    that works on the shards inside it (EWC's penalty, GPM's projection, PAM's alignment, clipping)
    gives DDP's numbers: the accuracies (LwF's within its tolerance) and task vectors within 1e-4."""
    methods = ["seq_ft", "ewc", "lwf", "pam", "became"]
    config = dict(CONFIG, methods=methods, train={**CONFIG["train"], "shard": "full"})
    (single / "fsdp.yaml").write_text(yaml.safe_dump(config))
    finished("run", single / "fsdp.yaml", "--out", single / "fsdp", "--quiet", "--nproc", 2)
    assert_same_run(ddp[1], single / "fsdp", methods)


def test_a_killed_two_process_run_resumes_to_the_same_numbers(single):
    run_dir = single / "killed"
    proc = mergecl(
        "run", single / "config.yaml", "--out", run_dir, "--quiet", "--nproc", 2,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    marker = run_dir / "seed0" / "ewc" / "task1.safetensors"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (run_dir / "seed0" / "became" / "task2.safetensors").exists()
    # the killed workers release the run's lock when the kernel has torn them down, which can take
    # longer than the 2 s a resume waits: wait for it as a user would (the message says to)
    with open(run_dir / ".mergecl.lock", "rb") as handle:
        deadline = time.time() + 60
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(handle, fcntl.LOCK_UN)
                break
            except BlockingIOError:
                assert time.time() < deadline, "the killed run's lock was never released"
                time.sleep(0.1)
    finished("run", "--resume", run_dir, "--quiet", "--nproc", 2)
    assert_same_run(single / "one", run_dir)


def test_sharded_optimizer_state_gives_the_same_run(single):
    config = dict(CONFIG, train={**CONFIG["train"], "shard": "optimizer"})
    (single / "zero.yaml").write_text(yaml.safe_dump(config))
    finished("run", single / "zero.yaml", "--out", single / "zero", "--quiet", "--nproc", 2)
    assert_same_run(single / "one", single / "zero")


def test_bf16_autocast_with_sharded_optimizer_state_trains_every_method(single):
    """The GPU recipe (bf16 autocast, ZeRO-1) run on CPUs: bf16 rounds each process's share on its
    own, so the numbers are not those of fp32; they must stay close, and tensors stay fp32."""
    methods = [*CONFIG["methods"], "gpm", "ind_ft"]
    config = dict(CONFIG, methods=methods, train={**CONFIG["train"], "shard": "optimizer", "amp": "bf16"})
    (single / "bf16.yaml").write_text(yaml.safe_dump(config))
    finished("run", single / "bf16.yaml", "--out", single / "bf16", "--quiet", "--nproc", 2)
    fp32, bf16 = metrics(single / "one"), metrics(single / "bf16")
    for name in CONFIG["methods"]:
        assert bf16[name]["final_acc"] == pytest.approx(fp32[name]["final_acc"], abs=5), name
    assert bf16["gpm"]["final_acc"] > 50 and bf16["ind_ft"]["final_acc"] > 20
    for stream in ("seq", "ind", "ewc", "lwf", "became", "gpm"):
        vector = load_file(single / "bf16" / "seed0" / stream / "task2.safetensors")
        assert all(v.dtype == torch.float32 and bool(v.isfinite().all()) for v in vector.values()), stream
