"""Training throughput of mergecl's loop with 1, 2, ... processes (torchrun + DDP), same global batch.

Each setting trains one task with ``train_task`` (DDP, sharded global batches) and reports the
global samples per second of the best of ``--repeats`` timed runs (after one warm-up run). Threads
per process: cores / processes (oversubscribed cores spin-wait), unless OMP_NUM_THREADS is set.

    python benchmarks/ddp_scaling.py --models mlp minilm --nproc 1 2
    python benchmarks/ddp_scaling.py --models minilm --nproc 1 2 4 8 --device cuda   # one GPU per process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORKER = "MERGECL_DDP_SCALING_WORKER"


def worker(model: str, device: str, repeats: int) -> None:
    import torch

    os.environ.setdefault("MERGECL_QUIET", "1")
    from mergecl import distributed
    from mergecl.data.types import Split
    from mergecl.models.factory import build_learner
    from mergecl.training.loop import TrainSettings, train_task

    distributed.init_from_env()
    dev = distributed.local_device(torch.device(device))
    g = torch.Generator().manual_seed(0)
    if model == "mlp":
        n = 8192
        data = Split(torch.randn(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g))
        spec, batch = {"name": "mlp", "in_dim": 784, "hidden": [1024, 1024]}, 256
    else:
        words = ["transfer", "money", "card", "balance", "weather", "alarm", "song", "flight", "hotel", "pin"]
        n = 512
        texts = [" ".join(words[(i * 7 + j) % 10] for j in range(8 + i % 8)) for i in range(n)]
        data = Split(texts, torch.randint(0, 10, (n,), generator=g), kind="text")
        spec, batch = {"name": "hf_text", "head": "linear"}, 32
    torch.manual_seed(0)
    learner = build_learner(spec, [f"c{i}" for i in range(10)], dev)
    settings = TrainSettings(epochs=1, batch_size=batch, lr=1e-4)
    best = float("inf")
    for run in range(repeats + 1):
        distributed.barrier()
        started = time.perf_counter()
        train_task(learner, data, list(range(10)), 10, settings, seed=run)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        distributed.barrier()
        if run > 0:
            best = min(best, time.perf_counter() - started)
    if distributed.is_main():
        print(json.dumps({"samples_per_s": n / best, "threads": torch.get_num_threads()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "minilm"], choices=["mlp", "minilm"])
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if os.environ.get(WORKER):
        worker(args.models[0], args.device, args.repeats)
        return
    print(f"{'model':<8} {'processes':>9} {'threads/proc':>12} {'samples/s':>10} {'speed-up':>9}")
    for model in args.models:
        first = None
        for nproc in args.nproc:
            threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
            env = dict(os.environ, **{WORKER: "1", "OMP_NUM_THREADS": threads})
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            command += [__file__, "--models", model, "--device", args.device, "--repeats", str(args.repeats)]
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            first = first or result["samples_per_s"]
            print(
                f"{model:<8} {nproc:>9} {result['threads']:>12} {result['samples_per_s']:>10.1f} "
                f"{result['samples_per_s'] / first:>8.2f}x"
            )


if __name__ == "__main__":
    main()
