"""Check that a code change changes no number: run the same configs with two source trees and
compare their results.json, timings and the machine line aside.

    python scripts/same_numbers.py run SRC OUT      # run every config with the mergecl in SRC
    python scripts/same_numbers.py compare OUT_A OUT_B

The configs: the embedded default, the digits smoke run, a digits run with every merge rule and
training method, and the quick benchmark suites on the data under $MERGECL_DATA (or the subsets in
the package when it is not set).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

EVERYTHING = {
    "name": "digits-everything",
    "seeds": [0, 1],
    "data": {"source": "digits", "scenario": "class", "n_tasks": 5, "train_per_class": 40},
    "model": {"name": "mlp", "in_dim": 64, "hidden": [64]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.002},
    "eval_val": True,
    "methods": [
        "zero_shot",
        "seq_ft",
        "ind_ft",
        "magmax",
        "average",
        "task_arithmetic",
        "ties",
        "ties@tensor",
        "random_mix",
        "one_over_t",
        "ind_ft+ties",
        "magmax@dare",
        "magmax@auto",
        "lwf",
        "ewc",
        "joint",
        "gpm",
        "became",
        "gpm_one_over_t",
        "seq_became",
    ],
    "method_options": {
        "ties@tensor": {"scope": "tensor", "keep": 0.3},
        "magmax@dare": {"dare": 0.3, "lam": 0.7},
        "magmax@auto": {"lam": "auto", "lam_grid": [0.3, 0.6, 1.0]},
        "joint": {"final_only": True},
    },
}
SUITES = ["clinc150-cil", "banking77-cil", "clinc150-cil-random", "clinc150-cil-pam", "banking77-cil-pam"]


def run_all(src: str, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()), MERGECL_QUIET="1")
    (out / "everything.json").write_text(json.dumps(EVERYTHING))
    jobs = [
        ["run", "--out", str(out / "default")],
        ["run", "digits", "--out", str(out / "digits")],
        ["run", str(out / "everything.json"), "--out", str(out / "everything")],
    ]
    jobs += [["bench", suite, "--quick", "--out", str(out / suite)] for suite in SUITES]
    for job in jobs:
        print("mergecl", *job, flush=True)
        subprocess.run([sys.executable, "-m", "mergecl", *job, "--quiet"], env=env, check=False)


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in ("wall_time_s", "machine")}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def compare(a: Path, b: Path) -> int:
    bad = 0
    for results in sorted(a.glob("*/results.json")):
        other = b / results.parent.name / "results.json"
        if not other.exists():
            print(f"{results.parent.name}: missing in {b}")
            bad += 1
            continue
        same = strip(json.loads(results.read_text())) == strip(json.loads(other.read_text()))
        print(f"{results.parent.name}: {'identical' if same else 'DIFFERENT'}")
        bad += not same
    return bad


if __name__ == "__main__":
    if sys.argv[1] == "run":
        run_all(sys.argv[2], Path(sys.argv[3]))
    else:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
