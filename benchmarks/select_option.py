"""Choose a method's option (EWC's lam, LwF's lam, PAM's p, ...) on VALIDATION data.

Runs the config once with one tagged variant of the method per value (``ewc@v0``, ``ewc@v1``, ...,
each a stream of its own with the same seeds), records validation accuracy matrices
(``eval_val: true``) and picks the value with the best final validation ACC over the tasks seen
(ties: the first value given). Seed 0 only by default; no test number enters the choice.

    python benchmarks/select_option.py configs/became-split-mnist.yaml --method ewc --option lam \\
        --values 1e3 1e4 3e4 1e5 3e5 1e6
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("MERGECL_QUIET", "1")

from mergecl.experiment.config import load_config, parse_config  # noqa: E402
from mergecl.experiment.runner import run  # noqa: E402


def scalar(text: str):
    """'1e3' -> 1000.0 (YAML 1.1 reads it as a string), 'zero' -> 'zero', 'true' -> True."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        return yaml.safe_load(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a config file or packaged config name")
    parser.add_argument("--method", required=True, help="a plain method: ewc, lwf, pam, became, ...")
    parser.add_argument("--option", required=True)
    parser.add_argument("--values", nargs="+", required=True, type=scalar, help="numbers or YAML scalars")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    base = load_config(args.config).model_dump()
    fixed = base["method_options"].get(args.method, {})
    names = [f"{args.method}@v{i}" for i in range(len(args.values))]
    options = {name: {**fixed, args.option: value} for name, value in zip(names, args.values, strict=True)}
    config = dict(base, seeds=args.seeds, methods=names, method_options=options, eval_val=True)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        results, _ = run(parse_config(config), out=Path(tmp) / "r", echo=lambda m: None, report=False)
    scores = {name: results["methods"][name]["val"]["final_acc"] for name in names}
    print(f"{args.method}.{args.option:<12} {'val final ACC':>14}")
    for name, value in zip(names, args.values, strict=True):
        print(f"{value!s:<{len(args.method) + 13}} {scores[name]:>14.2f}")
    best = max(names, key=lambda n: scores[n] if scores[n] == scores[n] else float("-inf"))  # NaN: diverged
    print(f"chosen {args.option}: {args.values[names.index(best)]} ({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
