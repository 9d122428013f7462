"""`mergecl merge --device cuda` against `--device cpu`: wall time, read speed, and how far apart the outputs are.

Builds the random Llama-layout model of peer_merge.py (``--params``, default ~220M) and ``--tasks``
fine-tuned copies (base + 0.01 noise), in bf16 and fp32; then, for each rule, runs ``mergecl merge``
on every device of ``--devices`` alternately (``--repeats`` times each, the first device
alternating), each in a fresh process (CUDA's start-up included) under peer_merge.py's protocol
(the previous output removed, disks synced, inputs read again, all untimed), and reports best and
median wall time, GB/s of checkpoint bytes read (base + T inputs, once; TIES with scope global reads
them four times), the peak memory (the process's RSS and its CPU merge workers' PSS, measured in a
run of its own), and the largest absolute difference from the first device's output.
``--check`` exits 1 when an output differs from it by more than ``--tolerance`` (default: 1e-5 for
fp32 outputs; for bf16 one bf16 step at 1.0, 2^-7, where the norm weights lie: the devices sum in
other orders, and a different last bit of an fp32 value can round to the next bf16 value).

    python benchmarks/gpu_merge.py --out /tmp/gpu-merge --check          # on a GPU machine (~10 min)
    python benchmarks/gpu_merge.py --out /tmp/gpu-merge-smoke --devices cpu --params 20e6 --tasks 2 \\
        --dtypes bf16 --rules average --repeats 1                       # a smoke run without a GPU

The models are kept in ``--out/models`` for reruns: give another ``--out`` for another size.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
from merge_speed import read_all  # the raw page-cache read
from peer_merge import RULES as PEER_RULES
from peer_merge import alternate, make_models, max_difference, model_arguments, output_file

# rule -> mergecl merge flags: peer_merge's (average, task_arithmetic, ties per tensor) and a rule of
# each other kind the device path runs differently: a running select, whole-model passes, draws
RULES = {name: flags for name, (flags, *_) in PEER_RULES.items()} | {
    "magmax": ["--method", "magmax"],
    "ties_global": ["--method", "ties", "--keep", "0.2", "--scope", "global"],
    "dare_ta": ["--method", "task_arithmetic", "--lam", "0.3", "--dare", "0.9"],
    "tsv_m": ["--method", "tsv_m"],  # one SVD per matrix and task: slow on the CPU, not run by default
}
DEFAULT_RULES = [name for name in RULES if name != "tsv_m"]
TOLERANCE = {"bf16": 2.0**-7, "fp32": 1e-5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(parser)
    parser.add_argument("--rules", nargs="+", default=DEFAULT_RULES, choices=list(RULES))
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="the first is the reference")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--check", action="store_true", help="exit 1 when outputs differ beyond the tolerance")
    parser.add_argument("--tolerance", type=float, help="largest allowed absolute difference (default: per dtype)")
    args = parser.parse_args()
    env = dict(os.environ, MERGECL_QUIET="1")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {gpu}")
    failures = []
    for dtype_name in args.dtypes:
        base, finetuned = make_models(args.out / "models", args.params, args.tasks, dtype_name)
        inputs = [output_file(path) for path in [base, *finetuned]]
        gigabytes = sum(path.stat().st_size for path in inputs) / 1e9
        read = min(read_all(inputs) for _ in range(2))  # the first warms the page cache
        print(f"\n{dtype_name}: T = {args.tasks}, {gigabytes:.2f} GB of checkpoints; page-cache read "
              f"{gigabytes / read:.2f} GB/s")  # fmt: skip
        print(f"| rule | device | best | median | GB/s (best) | peak memory MB | max diff vs {args.devices[0]} |")
        print("|:---|:---|---:|---:|---:|---:|---:|")
        tolerance = args.tolerance if args.tolerance is not None else TOLERANCE[dtype_name]
        for rule in args.rules:
            outs = {device: args.out / "merged" / f"{dtype_name}-{rule}-{device}" for device in args.devices}
            tools = {}
            for device in args.devices:
                cmd = [sys.executable, "-m", "mergecl", "merge", *RULES[rule], "--base", str(base)]
                cmd += ["--device", device, "-o", str(outs[device]), "--max-shard-size", "1000GB"]
                tools[device] = [*cmd, "--quiet", *map(str, finetuned)]
            runs = alternate(tools, outs, args.repeats, env, inputs)  # peer_merge's protocol
            reference = output_file(outs[args.devices[0]])
            for device, results in runs.items():
                walls = [wall for wall, _ in results]
                diff = "-"
                if device != args.devices[0]:
                    largest = max_difference(reference, output_file(outs[device]))
                    diff = f"{largest:.3g}"
                    if not largest <= tolerance:
                        failures.append(f"{dtype_name} {rule} on {device}: {largest:.3g} > {tolerance:.3g}")
                print(f"| {rule} | {device} | {min(walls):.2f} s | {statistics.median(walls):.2f} s | "
                      f"{gigabytes / min(walls):.2f} | {max(rss for _, rss in results):,.0f} | {diff} |")  # fmt: skip
    if args.check and failures:
        raise SystemExit("outputs differ beyond the tolerance:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
