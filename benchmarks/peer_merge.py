"""mergecl against mergekit on the same merges, side by side, and against the page-cache read speed.

Builds a random Llama-layout model (``--params``, default ~220M) and ``--tasks`` fine-tuned copies
(base + 0.01 noise per tensor), each saved with ``save_pretrained`` (one safetensors file per
directory), in bf16 and fp32; then, for each rule, runs ``mergecl merge`` and ``mergekit-yaml``
alternately (``--repeats`` times each, the first tool alternating), each in a fresh process, and
reports best and median wall time, GB/s of checkpoint bytes read (base + T inputs, once), the
process's peak memory (its RSS plus its worker processes' PSS), and the largest difference between
the two outputs; the raw read speed of the same files from the page cache (one reused buffer) is
measured in the same run. "merge GB/s" takes each tool's startup out of its best wall time (the
same interpreter and imports running ``--help``, best of 3: on a slow day importing torch alone
takes seconds). MagMax and random mix, which mergekit lacks, are timed for mergecl alone.
``--busy`` times every run again beside a second process that keeps one core busy, and reports how
much slower each tool got.

mergekit is never a dependency of mergecl: install it in its own virtual environment and pass its
interpreter (the CPU torch wheel, so that pip does not pull CUDA):

    python -m venv ~/mergekit-venv && ~/mergekit-venv/bin/pip install torch==2.13.0 mergekit==0.1.5
    python benchmarks/peer_merge.py --mergekit ~/mergekit-venv/bin/python --out /tmp/peer
    python benchmarks/peer_merge.py --params 20e6 --tasks 2 --repeats 1 --out /tmp/peer-smoke  # a smoke run
    python benchmarks/peer_merge.py --mergekit ~/mergekit-venv/bin/python --out /tmp/peer --busy  # contention

The rules, as each tool spells them (the same math; mergecl's TIES per tensor, as mergekit's):
average (mergekit ``linear``, normalised), task arithmetic lam 0.3, TIES keep 20 % lam 1. TIES
differs by one entry per tensor and task, by convention: mergecl keeps |x| >= the k-th smallest
magnitude, k = D - int(keep D) (the TIES and MagMax releases' kthvalue: int(keep D) + 1 entries),
mergekit exactly int(keep D) (a top-k); the entries that differ sit at the threshold, so the max
difference is about the threshold's magnitude (0.013 for fp32 copies with 0.01 noise at keep 20 %).
Without ``--mergekit`` only mergecl and the read speed are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from merge_speed import read_all  # the raw page-cache read, as merge_speed.py measures it

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# rule -> (mergecl merge flags, mergekit merge_method, per-model parameters, global parameters)
# (mergekit None: a rule mergekit does not have, timed for mergecl alone)
RULES = {
    "average": (["--method", "average"], "linear", {"weight": 1.0}, {"normalize": True}),
    "task_arithmetic": (["--method", "task_arithmetic", "--lam", "0.3"], "task_arithmetic", {"weight": 0.3}, {}),
    "ties": (
        ["--method", "ties", "--keep", "0.2", "--scope", "tensor", "--lam", "1"],
        "ties",
        {"density": 0.2, "weight": 1.0},
        {"normalize": True},
    ),
    "magmax": (["--method", "magmax"], None, {}, {}),
    "random_mix": (["--method", "random_mix"], None, {}, {}),
}
# the same interpreters and imports, merging nothing: what each wall time holds besides the merge
STARTUP = {
    "mergecl": ["-m", "mergecl", "merge", "--help"],
    "mergekit": ["-m", "mergekit.scripts.run_yaml", "--help"],
}
# a second busy process for --busy: one core spinning in Python, as another user's job would
BUSY = "while True: pass"


def llama_config(params: float):
    """A Llama layout of about ``params`` parameters: hidden 1024, intermediate 2816, layers to fit."""
    from transformers import LlamaConfig

    hidden, intermediate, vocab = 1024, 2816, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * intermediate + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden) / per_layer))
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=vocab,
        tie_word_embeddings=False,
    )


def make_models(folder: Path, params: float, tasks: int, dtype_name: str) -> tuple[Path, list[Path]]:
    """base/ and ft0..ftT-1/ under ``folder/dtype``, each a ``save_pretrained`` directory (kept between runs)."""
    from transformers import LlamaForCausalLM

    root = folder / dtype_name
    base, finetuned = root / "base", [root / f"ft{t}" for t in range(tasks)]
    if all((path / "model.safetensors").exists() for path in [base, *finetuned]):
        return base, finetuned
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(params)).to(DTYPES[dtype_name])
    model.save_pretrained(base, max_shard_size="100GB")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    for path in finetuned:
        with torch.no_grad():
            for key, value in model.state_dict().items():
                noise = torch.randn(value.shape, generator=generator).to(value.dtype)
                value.copy_(original[key] + 0.01 * noise)
        model.save_pretrained(path, max_shard_size="100GB")
    return base, finetuned


# The module a tool runs as, under a wrapper that writes the process's own peak RSS (VmHWM) to stderr
# at exit. wait4's ru_maxrss is not that: Linux carries the parent's peak (this script's, after it
# built the checkpoints) across fork + exec into the child. It reads VmHWM as merge_speed.peak_rss
# does, written out because it runs in the tool's interpreter (mergekit's venv cannot import ours).
PEAK_RSS = """import atexit, runpy, sys
def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            print("peak-rss-kb", line.split()[1], file=sys.stderr, flush=True)
atexit.register(peak)
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""


def child_pids(pid: int) -> list[str]:
    """``pid``'s child processes (mergecl's forked merge workers); none once it has ended."""
    try:
        return [c for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except OSError:
        return []


def workers_pss_kb(pid: int) -> int:
    """The proportional set size (PSS) of ``pid``'s child processes, summed; 0 when it has none."""
    total = 0
    for child in child_pids(pid):
        try:
            for line in Path(f"/proc/{child}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total


def timed(cmd: list[str], env: dict | None = None, workers: bool = True) -> tuple[float, float | None]:
    """(wall seconds, peak memory in MB) of one fresh process running ``cmd`` = [python, "-m", module,
    *args]. Memory: the process's own peak RSS plus the peak PSS of its child processes, sampled every
    10 ms (an upper bound: pages a child shares with the process count twice). A PSS sample costs the
    kernel 2-7 ms per 2 workers (it walks their page tables: on 2 busy cores it made a 1.9 s merge
    0.1 s slower), so with ``workers`` False the children are only looked for, and the memory is None
    if there were any: ``alternate`` then measures it in a run of its own."""
    python, flag, module, *args = cmd
    assert flag == "-m", cmd
    workers_peak, had_children = 0, False
    with tempfile.TemporaryFile() as stderr:  # a file, not a pipe: a chatty tool never blocks on it
        started = time.perf_counter()
        process = subprocess.Popen(
            [python, "-c", PEAK_RSS, module, *args], stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
        while process.poll() is None:
            if workers:
                workers_peak = max(workers_peak, workers_pss_kb(process.pid))
            else:
                had_children = had_children or bool(child_pids(process.pid))
            time.sleep(0.01)
        wall = time.perf_counter() - started
        stderr.seek(0)
        text = stderr.read().decode(errors="replace")
    if process.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{text[-2000:]}")
    own = max(int(kb) for kb in re.findall(r"peak-rss-kb (\d+)", text))
    return wall, None if had_children else (own + workers_peak) / 1024


def mergekit_config(rule: str, base: Path, finetuned: list[Path], dtype_name: str) -> str:
    _, method, per_model, params = RULES[rule]
    models = [{"model": str(path), "parameters": per_model} for path in finetuned]
    config = {"merge_method": method, "models": models, "dtype": {"bf16": "bfloat16", "fp32": "float32"}[dtype_name]}
    if method != "linear":
        config["base_model"] = str(base)
    if params:
        config["parameters"] = params
    return json.dumps(config)  # JSON is YAML


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def output_file(folder: Path) -> Path:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"{folder}: expected one safetensors file, found {len(files)}")
    return files[0]


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the models ``make_models`` builds, and where (gpu_merge.py takes them too)."""
    parser.add_argument("--out", type=Path, required=True, help="a scratch folder (models are kept for reruns)")
    parser.add_argument("--params", type=float, default=220e6)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser)
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mergekit", help="the Python of a virtual environment with mergekit")
    parser.add_argument("--busy", action="store_true", help="time every run again beside a busy process")
    args = parser.parse_args()
    env = dict(os.environ, MERGECL_QUIET="1")
    pythons = {"mergecl": sys.executable, **({"mergekit": args.mergekit} if args.mergekit else {})}
    startup = {name: min(timed([python, *STARTUP[name]], env)[0] for _ in range(3)) for name, python in pythons.items()}
    print("startup (interpreter and imports, best of 3): " + ", ".join(f"{k} {v:.2f} s" for k, v in startup.items()))
    for dtype_name in args.dtypes:
        base, finetuned = make_models(args.out / "models", args.params, args.tasks, dtype_name)
        inputs = [output_file(path) for path in [base, *finetuned]]
        gigabytes = sum(path.stat().st_size for path in inputs) / 1e9
        read_all(inputs)  # warm the page cache
        reads = [read_all(inputs) for _ in range(args.repeats)]
        print(f"\n{dtype_name}: T = {args.tasks}, {gigabytes:.2f} GB of checkpoints; page-cache read "
              f"{gigabytes / min(reads):.2f} GB/s (best of {args.repeats})")  # fmt: skip
        busy = " | best, busy | x quiet" if args.busy else ""
        header = "| rule | tool | best | median | GB/s (best) | merge GB/s | peak memory MB | max diff vs mergecl"
        print(f"{header} | mergecl faster by, best (median){busy} |")
        print("|:---|:---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.busy else ""))
        for rule in args.rules:
            tools = {"mergecl": [sys.executable, "-m", "mergecl", "merge", *RULES[rule][0], "--base", str(base)]}
            outs = {name: args.out / "merged" / f"{dtype_name}-{rule}-{name}" for name in ("mergecl", "mergekit")}
            tools["mergecl"] += ["-o", str(outs["mergecl"]), "--quiet", *map(str, finetuned)]
            if args.mergekit and RULES[rule][1] is not None:
                config = args.out / f"{dtype_name}-{rule}.yaml"
                config.write_text(mergekit_config(rule, base, finetuned, dtype_name))
                cli = [args.mergekit, "-m", "mergekit.scripts.run_yaml", str(config), str(outs["mergekit"])]
                tools["mergekit"] = cli + ["--lazy-unpickle", "--allow-crimes"]
            runs = alternate(tools, outs, args.repeats, env, inputs)
            busy_runs = {}
            if args.busy:
                spinner = subprocess.Popen([sys.executable, "-c", BUSY])
                try:
                    busy_runs = alternate(tools, outs, args.repeats, env, inputs, memory=False)  # walls only
                finally:
                    spinner.kill()
            for name, results in runs.items():
                walls = [wall for wall, _ in results]
                rss = max(peak for _, peak in results)
                diff = ratio = "-"
                if name != "mergecl":
                    diff = f"{max_difference(output_file(outs['mergecl']), output_file(outs[name])):.3g}"
                    ours = [wall for wall, _ in runs["mergecl"]]
                    ratio = f"{min(walls) / min(ours):.2f}x ({statistics.median(walls) / statistics.median(ours):.2f}x)"
                merge_rate = gigabytes / max(min(walls) - startup[name], 1e-9)
                row = (f"| {rule} | {name} | {min(walls):.2f} s | {statistics.median(walls):.2f} s | "
                       f"{gigabytes / min(walls):.2f} | {merge_rate:.2f} | {rss:,.0f} | {diff} | "
                       f"{ratio} |")  # fmt: skip
                if args.busy:
                    loaded = min(wall for wall, _ in busy_runs[name])
                    row += f" {loaded:.2f} s | {loaded / min(walls):.2f} |"
                print(row, flush=True)


def alternate(
    tools: dict, outs: dict, repeats: int, env: dict, inputs: list[Path], memory: bool = True
) -> dict[str, list[tuple]]:
    """``repeats`` timed runs of each tool, alternating which goes first; each tool's output from the
    run before is removed first and the disks synced (untimed), so that no run pays for deleting a
    0.4-0.9 GB file or for writing back the dirty pages of the run before it (mergekit does not
    fsync its output: the kernel would write it back during the next run, whichever tool's). The
    inputs are read once more before each run (untimed): mergekit's 8-9 GB beside both models' files
    evicts some of them on a 24 GB machine, and the run after it would read those from the disk.
    The timed runs do not sample their workers' memory; with ``memory``, a tool that has workers
    runs once more for it (else its memory stays None)."""
    runs: dict[str, list[tuple[float, float | None]]] = {name: [] for name in tools}

    def fresh(name: str) -> None:
        shutil.rmtree(outs[name], ignore_errors=True)
        os.sync()
        read_all(inputs)

    for repeat in range(repeats):
        for name in list(tools) if repeat % 2 == 0 else list(reversed(tools)):
            fresh(name)
            runs[name].append(timed(tools[name], env, workers=False))
    for name, results in runs.items():
        if memory and any(peak is None for _, peak in results):  # it forks workers: sampled in one run more
            fresh(name)
            peak = timed(tools[name], env)[1]
            runs[name] = [(wall, peak) for wall, _ in results]
    return runs


if __name__ == "__main__":
    main()
