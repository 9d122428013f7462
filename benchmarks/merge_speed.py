"""Merge-engine speed and memory against a naive stacking merge and the raw read ceiling.

Makes T in {2, 8, 32} synthetic checkpoints of ~50M parameters (24 tensors of 2048 x 1024) in fp32
and bf16, warms the page cache, then runs each merge in a fresh subprocess and reports wall time,
GB/s of checkpoint bytes read (base + T inputs, per pass) and the subprocess's peak RSS. The naive
merge is what the papers' code does: load every checkpoint whole, stack each tensor, reduce.

    python benchmarks/merge_speed.py --out /tmp/mergecl-bench      # full grid (~20 min here)
    python benchmarks/merge_speed.py --tasks 8 --dtypes fp32 --methods average magmax
    python benchmarks/merge_speed.py --tasks 8 --dtypes fp32 --naive --workers 1 2 4   # the thread pool
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPE = (2048, 1024)
TENSORS = 24  # 24 x 2M = 50.3M parameters
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_checkpoints(folder: Path, tasks: int, dtype_name: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[dtype_name]
    paths = [folder / f"{dtype_name}-base.safetensors"] + [
        folder / f"{dtype_name}-ft{t}.safetensors" for t in range(tasks)
    ]
    generator = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(SHAPE, generator=generator) for i in range(TENSORS)}
    for i, path in enumerate(paths):
        if path.exists():
            continue
        scale = 0.0 if i == 0 else 0.01
        state = {k: (v + scale * torch.randn(SHAPE, generator=generator)).to(dtype) for k, v in base.items()}
        save_file(state, str(path))
    return paths


def read_all(paths: list[Path]) -> float:
    """Raw sequential read of the files into one reused buffer: the ceiling for any merge."""
    buffer = bytearray(64 << 20)
    view = memoryview(buffer)
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(view):
                pass
    return time.perf_counter() - started


def naive_merge(base_path: str, ft_paths: list[str], method: str, out: str) -> None:
    """Load everything, stack per tensor, reduce: memory grows with T."""
    from safetensors.torch import load_file

    base = load_file(base_path)
    fts = [load_file(p) for p in ft_paths]
    merged = {}
    for key, theta0 in base.items():
        taus = torch.stack([ft[key].float() for ft in fts]) - theta0.float()
        if method == "average":
            tau = taus.mean(dim=0)
            lam = 1.0
        elif method == "magmax":
            index = taus.abs().flip(0).argmax(dim=0, keepdim=True)  # flip: ties go to the later task
            tau = taus.flip(0).gather(0, index)[0]
            lam = 0.5
        else:
            raise ValueError(method)
        merged[key] = (theta0.float() + lam * tau).to(theta0.dtype)
    save_file(merged, out)


def child(args) -> None:
    base, *fts = args.paths
    started = time.perf_counter()
    if args.engine == "naive":
        naive_merge(base, fts, args.method, args.output)
    else:
        from mergecl.merging import merge

        workers = int(args.engine.partition("-w")[2] or 1)  # "mergecl-w4": 4 threads
        merge(base, fts, args.method, out=args.output, workers=workers)
    wall = time.perf_counter() - started
    print(json.dumps({"wall_s": wall, "peak_rss": peak_rss()}))


def peak_rss() -> int:
    """VmHWM: the peak RSS of this process image. (getrusage's ru_maxrss is not used: Linux
    carries the parent's peak across fork + exec into it.)"""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_child(engine: str, method: str, paths: list[Path], output: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", engine, method, str(output), *map(str, paths)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def interpreter_rss() -> int:
    code = (
        "import torch, safetensors, mergecl.merging; "
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/mergecl-bench", help="folder for the synthetic checkpoints")
    parser.add_argument("--tasks", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--methods", nargs="+", default=["average", "magmax", "ties", "random_mix"])
    parser.add_argument("--naive", nargs="*", default=["average", "magmax"], help="methods to run naively too")
    parser.add_argument("--workers", type=int, nargs="+", default=[1], help="merge engine threads (mergecl-wN)")
    parser.add_argument("--naive-max-tasks", type=int, default=8, help="skip the naive merge above this T")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        engine, method, output, *paths = args.child
        child(argparse.Namespace(engine=engine, method=method, output=output, paths=paths))
        return

    folder = Path(args.out)
    base_rss = interpreter_rss()
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, interpreter+imports RSS {base_rss / 1e6:.0f} MB")
    header = (
        f"{'dtype':<5} {'T':>3} {'method':<12} {'engine':<10} {'wall s':>7} {'GB/s':>6} "
        f"{'peak RSS MB':>11} {'RSS/model':>9}"
    )
    print(header)
    rows = []
    for dtype_name in args.dtypes:
        for tasks in args.tasks:
            paths = make_checkpoints(folder, tasks, dtype_name)
            model_bytes = paths[0].stat().st_size
            read_bytes = model_bytes * (tasks + 1)
            read_all(paths)  # warm the page cache
            raw = read_all(paths)
            rows.append((dtype_name, tasks, "raw read", "-", raw, read_bytes / raw / 1e9, 0, 0))
            print(f"{dtype_name:<5} {tasks:>3} {'raw read':<12} {'-':<10} {raw:7.2f} {read_bytes / raw / 1e9:6.2f}")
            for method in args.methods:
                engines = ["mergecl" if w == 1 else f"mergecl-w{w}" for w in args.workers]
                if method in args.naive and tasks <= args.naive_max_tasks:
                    engines.append("naive")
                for engine in engines:
                    out = folder / f"out-{engine}.safetensors"
                    result = run_child(engine, method, paths, out)
                    passes = 4 if (method == "ties" and engine != "naive") else 1
                    gbs = passes * read_bytes / result["wall_s"] / 1e9
                    rss = result["peak_rss"]
                    ratio = (rss - base_rss) / model_bytes
                    rows.append((dtype_name, tasks, method, engine, result["wall_s"], gbs, rss, ratio))
                    print(
                        f"{dtype_name:<5} {tasks:>3} {method:<12} {engine:<10} {result['wall_s']:7.2f} "
                        f"{gbs:6.2f} {rss / 1e6:11.0f} {ratio:9.2f}"
                    )
                    out.unlink(missing_ok=True)
    print("RSS/model = (peak RSS - interpreter RSS) / one checkpoint's size; ties reads its inputs 4 times.")


if __name__ == "__main__":
    main()
