"""Cost of BECAME's extra work per task, as a fraction of one training epoch on the same task.

Per task BECAME adds two diagonal-Fisher passes (at theta_hat and at the merged model) over the
task's training set, and GPM adds a representation pass on 125 examples plus an SVD per layer.
This times each piece against one epoch of ``train_task`` (SGD, the same batch size) and reports
the extra tensors held (F, Lambda, theta_gp, bases). Settings:

- mlp: MLP 784-100-100 on split-MNIST task 1 (real data, $MERGECL_DATA/mnist), batch 32;
- alexnet5: GPM's AlexNet-5 on random 3x32x32 images (CIFAR-100 is not on this machine), batch 64;
- minilm: the real all-MiniLM-L6-v2 on a CLINC150 domain (15 intents, real data), batch 16.

    python benchmarks/became_cost.py                      # all three
    python benchmarks/became_cost.py --models mlp --repeats 3
"""

from __future__ import annotations

import argparse
import os
import time

import torch

os.environ.setdefault("MERGECL_QUIET", "1")

from mergecl.data.scenarios import build_scenario  # noqa: E402
from mergecl.data.types import Split  # noqa: E402
from mergecl.models.factory import build_learner  # noqa: E402
from mergecl.training.fisher import diagonal_fisher  # noqa: E402
from mergecl.training.gpm import GPMemory, collect_representations, projectable_layers, update_basis  # noqa: E402
from mergecl.training.loop import TrainSettings, train_task  # noqa: E402


def setting(name: str):
    """(learner, task train split, its classes, number of classes, batch size, description)."""
    torch.manual_seed(0)
    if name == "mlp":
        scenario = build_scenario("task", "mnist", 5, "natural", 0)
        task = scenario.tasks[0]
        learner = build_learner({"name": "mlp", "in_dim": 784, "hidden": [100, 100]}, scenario.class_names)
        return learner, task.train, task.classes, 10, 32, "MLP 784-100-100, split-MNIST task 1"
    if name == "alexnet5":
        n = 1000
        g = torch.Generator().manual_seed(0)
        data = Split(torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
        learner = build_learner({"name": "alexnet5"}, [f"c{i}" for i in range(100)])
        return learner, data, list(range(10)), 100, 64, f"AlexNet-5, {n} random 3x32x32 images, 10 classes"
    if name == "minilm":
        scenario = build_scenario("task", "clinc150", None, "groups", 0)
        task = scenario.tasks[0]
        learner = build_learner({"name": "hf_text", "head": "zero_shot"}, scenario.class_names)
        return learner, task.train, task.classes, scenario.num_classes, 16, f"MiniLM, CLINC150 domain '{task.name}'"
    raise SystemExit(f"unknown model {name!r}")


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def measure(name: str, repeats: int) -> dict:
    learner, data, classes, num_classes, batch, desc = setting(name)
    settings = TrainSettings(optimizer="sgd", lr=1e-3, epochs=1, batch_size=batch, schedule="constant")
    start = {k: v.clone() for k, v in learner.state_dict().items()}

    def epoch():
        learner.load_state_dict(start)
        train_task(learner, data, classes, num_classes, settings, seed=0)

    layers = projectable_layers(learner)
    first = GPMemory()
    first.update(learner, data, layers, eps=0.97)  # task 1's memory: the later update is the residual one
    reps = {}

    def collect():
        reps.update(collect_representations(learner, data, layers, 125, seed=1))

    def svd():
        for layer, rep in reps.items():
            update_basis(first.bases.get(layer), rep, 0.973)

    t_epoch = timed(epoch, repeats)
    t_fisher = timed(lambda: diagonal_fisher(learner, data, classes, num_classes, batch_size=batch), repeats)
    t_collect = timed(collect, repeats)
    t_svd = timed(svd, repeats)
    params = sum(p.numel() for p in learner.parameters() if p.requires_grad)
    floats = sum(v.numel() for v in learner.state_dict().values() if v.is_floating_point())
    bases = sum(b.numel() for b in first.bases.values())
    return {
        "desc": desc,
        "n": len(data),
        "epoch": t_epoch,
        "fisher": t_fisher,
        "collect": t_collect,
        "svd": t_svd,
        "params": params,
        "mb_state": 4 * (2 * params + floats) / 2**20,  # F, Lambda (per parameter) and theta_gp
        "mb_bases": 4 * bases / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "alexnet5", "minilm"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(
        "| model | train examples | 1 epoch s | Fisher pass s (x epoch) | BECAME's 2 Fisher passes (x epoch) "
        "| GPM representations s | GPM SVDs s | GPM total (x epoch) | F + Lambda + theta_gp MB | bases MB (task 1) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models:
        r = measure(name, args.repeats)
        gpm = r["collect"] + r["svd"]
        print(
            f"| {r['desc']} | {r['n']} | {r['epoch']:.2f} | {r['fisher']:.2f} ({r['fisher'] / r['epoch']:.2f}) "
            f"| {2 * r['fisher']:.2f} ({2 * r['fisher'] / r['epoch']:.2f}) | {r['collect']:.2f} | {r['svd']:.2f} "
            f"| {gpm:.2f} ({gpm / r['epoch']:.2f}) | {r['mb_state']:.1f} | {r['mb_bases']:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
