"""The continual-merging literature's ranking (docs/results/continual-merging.md) judged on a finished
run of a ``*-continual`` suite: every rule over Ind-FT task vectors (the protocol of OPCM, DOP and
later papers) and over Seq-FT ones (MagMax's), several task orders x seeds.

    python benchmarks/continual_claims.py runs/banking77-continual [runs/banking77-continual-svd ...]

Prints, from each RUN_DIR/results.json (several runs of the same data: their methods side by side),
a table of final ACC and BWT, mean ± std over every (seed, order) stream (and the time a stream
spent on the method: its merges and evaluations, plus its training where it trained: Ind-FT trains
in a seed's first order only), and judges each claim "A above B" on the streams both ran, paired:
the mean of A - B with a 95 % interval over seeds (``judge``). Verdict: "reproduced" when the
interval lies above 0, "reversed" when it lies below, "inconclusive" when it holds 0.

The published numbers (CLIP ViT-B/32, 8 vision tasks, ACC averaged over task orders, as the OPCM
paper reports them and later papers repeat): OPCM 75.5, MagMax over independent checkpoints 70.7,
continual task arithmetic 67.5, weight averaging 66.3, sequential fine-tuning 79.8.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from mergecl.experiment.config import ORDER_STRIDE

# (claim, A, B): "A's final ACC is above B's"; names are the run's methods
CLAIMS = [
    ("(a) OPCM above MagMax, both over Ind-FT (75.5 vs 70.7)", "ind_ft+opcm", "ind_ft+magmax"),
    (
        "(b) MagMax above continual task arithmetic over Ind-FT (70.7 vs 67.5)",
        "ind_ft+magmax",
        "ind_ft+task_arithmetic",
    ),
    (
        "(c) continual task arithmetic above averaging over Ind-FT (67.5 vs 66.3)",
        "ind_ft+task_arithmetic",
        "ind_ft+average",
    ),
    ("(d) OPCM above TIES over Ind-FT (the OPCM paper puts every baseline below it)", "ind_ft+opcm", "ind_ft+ties"),
    ("(e) OPCM above Iso-C over Ind-FT (not a published comparison)", "ind_ft+opcm", "ind_ft+iso_c"),
    ("(f) Seq-FT above OPCM over Ind-FT (79.8 vs 75.5)", "seq_ft", "ind_ft+opcm"),
    ("(g) DOP above OPCM over Ind-FT (the DOP paper)", "ind_ft+dop", "ind_ft+opcm"),
    ("(h) Iso-CTS above Iso-C over Ind-FT (the isotropic-merging paper)", "ind_ft+iso_cts", "ind_ft+iso_c"),
    ("(i) TSV-M above TIES over Ind-FT (the task-singular-vectors paper)", "ind_ft+tsv_m", "ind_ft+ties"),
    ("(j) KnOTS above TIES over Ind-FT (the KnOTS paper, made for LoRA)", "ind_ft+knots", "ind_ft+ties"),
    ("(k) OPCM above continual TIES over Ind-FT (the OPCM paper)", "ind_ft+opcm", "ind_ft+continual_ties"),
]
RULES = (
    "magmax",
    "average",
    "task_arithmetic",
    "ties",
    "iso_c",
    "opcm",
    "tsv_m",
    "iso_cts",
    "knots",
    "continual_ties",
    "dop",
)


def finished_streams(entry: dict, num_tasks: int) -> dict[str, dict]:
    """(seed, order) -> the method's numbers on that stream, for the streams that ran every step (a
    stream stopped early, as in a run still going, is left out)."""
    seeds = entry.get("seeds")
    if seeds is None:  # one stream ran: its numbers are the entry's
        seeds = {stream: entry for stream in entry.get("coverage", {})}
    return {stream: seeds[stream] for stream, steps in entry.get("coverage", {}).items() if steps == num_tasks}


def per_stream(streams: dict[str, dict], key: str) -> dict[str, float]:
    return {stream: values[key] for stream, values in streams.items() if values.get(key) is not None}


def mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def cell(entry: dict[str, dict], key: str) -> str:
    values = list(per_stream(entry, key).values())
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}"


# two-sided 95 % quantiles of Student's t by degrees of freedom (a normal's 1.96 past 30)
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def config_seed(stream: str) -> int:
    """The config seed of a run seed (order k of seed s runs as s + k * 1,000,000)."""
    return int(stream) % ORDER_STRIDE


def judge(a: dict[str, dict], b: dict[str, dict]) -> tuple[str, str]:
    """The paired difference of final ACC, A - B, over the streams both ran, and a verdict. The
    orders of one seed are not independent (they share its class split, theta_0 and, for Ind-FT,
    its task vectors: an order-free rule such as averaging ends at the same model in every order),
    so the unit is the seed: each seed's mean difference over its orders, and a 95 % t interval over
    seeds. With one seed there is no interval and no verdict. A win is a difference above 1e-6
    (accuracies computed in float32 differ in the last digits)."""
    x, y = per_stream(a, "final_acc"), per_stream(b, "final_acc")
    both = sorted(set(x) & set(y))
    if len(both) == 1:
        return f"A - B = {x[both[0]] - y[both[0]]:+.2f} on the one stream both ran (no interval)", "not judged"
    if not both:
        return "no common stream", "not judged"
    diffs = {s: x[s] - y[s] for s in both}
    wins = sum(d > 1e-6 for d in diffs.values())
    seeds = sorted({config_seed(s) for s in both})
    units = [mean_std([d for s, d in diffs.items() if config_seed(s) == seed])[0] for seed in seeds]
    if len(units) < 2:  # orders of one seed share its split and vectors: no interval, no verdict
        mean = units[0]
        return f"A - B = {mean:+.2f} over {len(diffs)} orders of one seed; A above in {wins}/{len(diffs)}", "not judged"
    mean, std = mean_std(units)
    half = T95.get(len(units) - 1, 1.96) * std / math.sqrt(len(units))
    interval = f"95 % interval over {len(units)} seeds {mean - half:+.2f} .. {mean + half:+.2f}"
    detail = f"A - B = {mean:+.2f} ({interval}); A above in {wins}/{len(diffs)} streams"
    verdict = "reproduced" if mean - half > 0 else "reversed" if mean + half < 0 else "inconclusive"
    return detail, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    methods: dict[str, dict[str, dict]] = {}  # method -> stream -> numbers, over the runs given
    for run in args.runs:
        results = json.loads((run / "results.json").read_text())
        for name, entry in results["methods"].items():
            streams = finished_streams(entry, results["run"]["num_tasks"])
            # a stream two runs both ran is the same stream (same data and training): the first run's is kept
            methods[name] = {**streams, **methods.get(name, {})}
    print("| method | vectors | streams | final ACC | BWT | time per stream |")
    print("|:---|:---|---:|---:|---:|---:|")
    names = [m for m in ("zero_shot", "seq_ft", "ind_ft") if m in methods]
    names += [m for rule in RULES for m in (rule, f"ind_ft+{rule}") if m in methods]
    for name in names:
        entry = methods[name]
        vectors = "-" if name == "zero_shot" else "Ind-FT" if name.startswith("ind_ft") else "Seq-FT"
        streams = len(per_stream(entry, "final_acc"))
        times = list(per_stream(entry, "wall_time_s").values())
        time = f"{sum(times) / len(times):.0f} s" if times else "-"
        print(f"| {name} | {vectors} | {streams} | {cell(entry, 'final_acc')} | {cell(entry, 'bwt')} | {time} |")
    print()
    for claim, a, b in CLAIMS:
        if a not in methods or b not in methods:
            print(f"- {claim}: not judged ({a if a not in methods else b} was not run)")
            continue
        detail, verdict = judge(methods[a], methods[b])
        print(f"- {claim}: **{verdict}**. A = {a}, B = {b}: {detail}")
    pairs = [(r, f"ind_ft+{r}") for r in RULES if r in methods and f"ind_ft+{r}" in methods]
    print()
    for seq, ind in pairs:
        detail, verdict = judge(methods[seq], methods[ind])
        print(f"- (MagMax paper) {seq} over Seq-FT vectors above over Ind-FT ones: **{verdict}**. {detail}")


if __name__ == "__main__":
    main()
