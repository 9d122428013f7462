"""Choose a suite's learning rate on VALIDATION data, by a method-neutral criterion.

For each learning rate, train Ind-FT (every task from theta_0) and measure each task model's
validation accuracy on its own task (the diagonal of the validation accuracy matrix): how well the
encoder learns one task at that rate. No merge and no test data enter the choice, so it favours no
method. Seed 0 only.

    python benchmarks/select_lr.py clinc150-cil --lrs 1e-5 3e-5 1e-4 3e-4
    python benchmarks/select_lr.py --config my-run.yaml --lrs 1e-3 3e-3
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MERGECL_QUIET", "1")

from mergecl.experiment.bench import SUITES, suite_config  # noqa: E402
from mergecl.experiment.config import load_config, parse_config  # noqa: E402
from mergecl.experiment.runner import run  # noqa: E402


def plasticity(run_dir: Path) -> float:
    rows = json.loads((run_dir / "progress.json").read_text())["seeds"]["0"]["val_rows"]["ind_ft"]
    return sum(rows[t][t] for t in range(len(rows))) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", nargs="?", choices=SUITES)
    parser.add_argument("--config", help="a config file instead of a suite")
    parser.add_argument("--lrs", type=float, nargs="+", required=True)
    args = parser.parse_args()
    base = (suite_config(args.suite) if args.suite else load_config(args.config)).model_dump()
    print(f"{'lr':>10} {'val acc on own task':>20} {'time s':>8}")
    scores = {}
    for lr in args.lrs:
        config = dict(base, seeds=[0], methods=["ind_ft"], method_options={}, eval_val=True)
        config["train"] = dict(base["train"], lr=lr)
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            run(parse_config(config), out=Path(tmp) / "r", echo=lambda m: None, report=False)
            scores[lr] = plasticity(Path(tmp) / "r")
        print(f"{lr:>10.2e} {scores[lr]:>20.2f} {time.perf_counter() - started:>8.0f}")
    best = max(scores, key=lambda lr: (scores[lr], -lr))
    print(f"chosen lr: {best:g}")


if __name__ == "__main__":
    main()
