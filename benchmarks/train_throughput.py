"""Training throughput of mergecl's loop against a bare PyTorch loop on the same model and data.

Both loops do the same work per step: index a shuffled batch, forward, cross-entropy over the
task's columns, backward, clip at norm 1.0, AdamW step, with a warm-up + cosine learning rate.
mergecl's adds its label remapping, hooks, progress bookkeeping and loss logging. Each setting is
timed several times, alternating the two loops, and the best time of each is kept.

    python benchmarks/train_throughput.py              # MLP on 784-d inputs and the real MiniLM
    python benchmarks/train_throughput.py --models mlp --repeats 5
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
from torch import nn

os.environ.setdefault("MERGECL_QUIET", "1")

from mergecl.data.types import Split  # noqa: E402
from mergecl.models.factory import build_learner  # noqa: E402
from mergecl.training.loop import TrainSettings, lr_factor, train_task  # noqa: E402


def bare_loop(learner, data: Split, classes: list[int], settings: TrainSettings, seed: int) -> None:
    """What a user would write by hand: no hooks, no remapping table, no stats."""
    params = [p for p in learner.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    columns = torch.tensor(classes)
    remap = torch.zeros(max(classes) + 1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    steps = math.ceil(settings.epochs * math.ceil(len(data) / settings.batch_size))
    learner.train()
    step = 0
    while step < steps:
        for index in torch.randperm(len(data), generator=generator).split(settings.batch_size):
            if step >= steps:
                break
            batch = data.subset(index)
            labels = remap[batch.labels]
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * lr_factor(step, steps, settings.warmup_steps, settings.schedule)
            loss = nn.functional.cross_entropy(learner(learner.prepare(batch.inputs, train=True))[:, columns], labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            step += 1


def setting(name: str):
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        n, dim = 8192, 784
        data = Split(torch.randn(n, dim, generator=g), torch.randint(0, 10, (n,), generator=g))
        spec = {"name": "mlp", "in_dim": dim, "hidden": [1024, 1024]}
        names = [str(i) for i in range(10)]
        return spec, names, data, TrainSettings(lr=1e-3, epochs=2, batch_size=128, warmup_steps=10)
    if name == "minilm":
        import json

        from mergecl.data.registry import data_root

        rows = json.loads((data_root() / "clinc150" / "data_full.json").read_text())["train"][:512]
        names = sorted({intent for _, intent in rows})
        data = Split([t for t, _ in rows], torch.tensor([names.index(i) for _, i in rows]), kind="text")
        spec = {"name": "hf_text"}
        return spec, names, data, TrainSettings(lr=2e-5, epochs=1, batch_size=32, warmup_steps=5)
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["mlp", "minilm"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<8} {'examples':>8} {'bare ex/s':>10} {'mergecl ex/s':>13} {'mergecl/bare':>13}")
    for name in args.models:
        spec, names, data, settings = setting(name)
        classes = sorted(set(data.labels.tolist()))
        torch.manual_seed(0)
        learner = build_learner(spec, names)
        start = {k: v.clone() for k, v in learner.state_dict().items()}
        best = {"bare": float("inf"), "mergecl": float("inf")}
        for _ in range(args.repeats):
            for loop in ("bare", "mergecl"):
                learner.load_state_dict(start)
                began = time.perf_counter()
                if loop == "bare":
                    bare_loop(learner, data, classes, settings, seed=0)
                else:
                    train_task(learner, data, classes, len(names), settings, seed=0)
                best[loop] = min(best[loop], time.perf_counter() - began)
        examples = settings.epochs * len(data)
        bare, ours = examples / best["bare"], examples / best["mergecl"]
        print(f"{name:<8} {examples:>8.0f} {bare:>10.1f} {ours:>13.1f} {ours / bare:>13.3f}")


if __name__ == "__main__":
    main()
