"""The peer benchmark's protocol (benchmarks/peer_merge.py): timed runs do not sample the memory of
a tool's worker processes (the kernel's page-table walk for it ran on the cores the merge used), a
tool with workers runs once more for that memory, and every tool runs exactly ``repeats`` timed
times per rule, alternating. The tools here are two small Python modules, one forking a child."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peer_merge  # noqa: E402 (a script folder, put on the path just above)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the benchmark reads /proc")

TOOL = """import os, sys, time
from pathlib import Path
Path(sys.argv[1]).open("a").write("run\\n")
Path(sys.argv[2]).mkdir()  # its output: the protocol removes it before the next run
if {fork}:
    pid = os.fork()
    if pid == 0:
        block = bytearray(64 << 20)  # a worker's memory, touched
        for i in range(0, len(block), 4096):
            block[i] = 1
        time.sleep(0.6)
        os._exit(0)
    os.waitpid(pid, 0)
else:
    time.sleep(0.3)
"""


@pytest.fixture
def tools(tmp_path, monkeypatch):
    for name, fork in (("forking_tool", True), ("plain_tool", False)):
        (tmp_path / f"{name}.py").write_text(TOOL.format(fork=fork))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    outs = {name: tmp_path / f"out-{name}" for name in ("forking", "plain")}
    commands = {
        name: [sys.executable, "-m", f"{name}_tool", str(tmp_path / f"{name}.count"), str(outs[name])]
        for name in ("forking", "plain")
    }
    return commands, outs, tmp_path


def test_a_timed_run_only_looks_for_workers_and_a_sampled_one_measures_them(tools):
    commands, outs, _ = tools
    wall, memory = peer_merge.timed(commands["forking"], workers=False)
    assert wall > 0.6 and memory is None  # it had a child: its memory is left to a run of its own
    outs["forking"].rmdir()
    wall, memory = peer_merge.timed(commands["forking"])
    assert memory > 64  # MB: the interpreter plus the child's 64 MB
    wall, memory = peer_merge.timed(commands["plain"], workers=False)
    assert memory is not None and memory < 64  # no child: its own peak RSS, from the timed run


def test_alternate_times_each_tool_repeats_times_and_measures_workers_once_more(tools):
    commands, outs, folder = tools
    inputs = [folder / "forking_tool.py"]
    runs = peer_merge.alternate(commands, outs, 2, None, inputs)
    assert (folder / "plain.count").read_text().count("run") == 2
    assert (folder / "forking.count").read_text().count("run") == 3  # 2 timed + 1 for its memory
    assert [len(runs[name]) for name in ("forking", "plain")] == [2, 2]
    assert all(memory > 64 for _, memory in runs["forking"])
    assert all(memory is not None and memory < 64 for _, memory in runs["plain"])
