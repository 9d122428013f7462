"""`mergecl learn` on real data: CLINC150 learned domain by domain, one `mergecl learn add` per domain.

Writes each CLINC150 domain (15 intents; the data set's own train / validation / test rows) as a
JSON-lines file with the columns text, label and split, as a user would hand them over; then runs
the command line as a user does: `mergecl learn init DIR [--config LEARN.yaml]` and one
`mergecl learn add DIR --task DOMAIN --data DOMAIN.jsonl` per domain, each a process of its own,
timed from outside. After each add it records the decision (an add the gate refuses is promoted by
hand with `mergecl learn promote`, so that the sequence goes on, and said in the table), ACC, BWT
and the method's state on disk (`mergecl learn status --json`). Prints a Markdown table.

    python benchmarks/learn_clinc150.py OUT                        # the defaults: Seq-FT + MagMax
    python benchmarks/learn_clinc150.py OUT --method ind_ft+ties --train-per-class 10

CLINC150 comes from $MERGECL_DATA/clinc150 (data_full.json, domains.json; the `clinc150` source).
``--train-per-class`` subsamples the training rows (seeded) for a cheaper run; the state sizes do not
depend on it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from mergecl.data.registry import get_source
from mergecl.data.splits import subsample_per_class


def write_domains(out: Path, train_per_class: int | None) -> list[tuple[str, Path]]:
    data = get_source("clinc150")
    files = []
    for domain, classes in data.class_groups.items():
        rows = []
        for split, part in (("train", data.train), ("validation", data.val), ("test", data.test)):
            if split == "train" and train_per_class:
                part = subsample_per_class(part, train_per_class, seed=0)
            for text, label in zip(part.inputs, part.labels.tolist(), strict=True):
                if label in classes:
                    rows.append({"text": text, "label": data.class_names[label], "split": split})
        path = out / f"{domain}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        files.append((domain, path))
    return files


def mergecl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mergecl", *args], capture_output=True, text=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="a new folder: the domain files and the model directory")
    parser.add_argument("--method", default=None, help="the learn method (default: the defaults' magmax)")
    parser.add_argument("--max-drop", type=float, default=None, help="the gate (default: the policy's 5 points)")
    parser.add_argument("--train-per-class", type=int, default=None, help="subsample the training rows")
    parser.add_argument("--tasks", type=int, default=10, help="how many domains to add (default: all 10)")
    args = parser.parse_args()
    args.out.mkdir(parents=True)
    files = write_domains(args.out, args.train_per_class)[: args.tasks]
    model = args.out / "model"
    init = ["learn", "init", str(model)]
    if args.method or args.max_drop is not None:
        config = {"method": args.method} if args.method else {}
        if args.max_drop is not None:
            config["policy"] = {"max_drop": args.max_drop}
        (args.out / "learn.yaml").write_text(json.dumps(config))
        init += ["--config", str(args.out / "learn.yaml")]
    done = mergecl(*init)
    if done.returncode:
        sys.exit(done.stderr)
    print("| task | domain | add (s) | decision | ACC | BWT | state on disk (MiB) |")
    print("|---:|:---|---:|:---|---:|---:|---:|")
    for k, (domain, path) in enumerate(files, 1):
        started = time.perf_counter()
        done = mergecl("learn", "add", str(model), "--task", domain, "--data", str(path), "--quiet")
        seconds = time.perf_counter() - started
        if done.returncode not in (0, 3):
            sys.exit(done.stderr)
        decision = "promoted"
        if done.returncode == 3:
            ledger = json.loads((model / "learn.json").read_text())
            decision = f"refused ({ledger['candidate']['note']}); promoted by hand"
            if mergecl("learn", "promote", str(model)).returncode:
                sys.exit("promote failed")
        status = json.loads(mergecl("learn", "status", str(model), "--json").stdout)
        bwt = f"{status['bwt']:+.2f}" if status["bwt"] is not None else "-"
        mib = status["state_bytes"] / 2**20
        print(f"| {k} | {domain} | {seconds:.1f} | {decision} | {status['acc']:.2f} | {bwt} | {mib:.1f} |", flush=True)
    print()
    print(mergecl("learn", "status", str(model)).stdout)


if __name__ == "__main__":
    main()
