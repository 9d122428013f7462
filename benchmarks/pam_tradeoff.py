"""PAM's stability-plasticity trade-off over p, from a finished run (e.g. `mergecl bench clinc150-cil-pam`).

For every PAM stream of the run (pam, pam@TAG) with the default reset and merge, print p, stability
(BWT, and forgetting) and plasticity (the accuracy on the newest task right after learning it,
mean over steps of A[t][t]), each mean (std) over seeds, and plot BWT against plasticity.

    python benchmarks/pam_tradeoff.py RUN_DIR [--out docs/img/pam-tradeoff-clinc150.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml

from mergecl.methods.pam import PamOptions


def plasticity(matrix: list[list[float | None]]) -> float:
    return statistics.fmean(matrix[t][t] for t in range(len(matrix)))


def sweep(run_dir: Path) -> list[dict]:
    results = json.loads((run_dir / "results.json").read_text())
    options = yaml.safe_load((run_dir / "config.yaml").read_text()).get("method_options") or {}
    points = []
    for name, entry in results["methods"].items():
        if name.partition("@")[0] != "pam":
            continue
        defaults = PamOptions().model_dump()
        chosen = {**defaults, **options.get(name, {})}
        if any(chosen[k] != defaults[k] for k in ("reset", "merge", "scope")):
            continue  # the sweep varies p alone
        per_seed = entry.get("seeds") or {"0": entry}
        plast = [plasticity(s["accuracy_matrix"]) for s in per_seed.values()]
        bwt = [s["bwt"] for s in per_seed.values()]
        points.append(
            {
                "method": name,
                "p": float(chosen["p"]),
                "bwt": statistics.fmean(bwt),
                "bwt_std": statistics.stdev(bwt) if len(bwt) > 1 else 0.0,
                "plasticity": statistics.fmean(plast),
                "plasticity_std": statistics.stdev(plast) if len(plast) > 1 else 0.0,
                "final_acc": entry["final_acc"],
                "forgetting": entry["forgetting"],
            }
        )
    return sorted(points, key=lambda point: point["p"])


def plot(points: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    xs, ys = [p["plasticity"] for p in points], [p["bwt"] for p in points]
    ax.errorbar(xs, ys, xerr=[p["plasticity_std"] for p in points], yerr=[p["bwt_std"] for p in points], fmt="o-")
    for point in points:
        ax.annotate(f"p={point['p']:g}", (point["plasticity"], point["bwt"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("plasticity: accuracy on the newest task (mean A[t][t], %)")
    ax.set_ylabel("stability: BWT (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="where to write the plot (PNG)")
    args = parser.parse_args()
    points = sweep(args.run_dir)
    if not points:
        raise SystemExit(f"{args.run_dir}: no PAM streams with the default reset/merge/scope")
    print(f"{'method':<10} {'p':>5} {'BWT':>14} {'plasticity':>14} {'final ACC':>10} {'forgetting':>10}")
    for p in points:
        print(
            f"{p['method']:<10} {p['p']:>5.2f} {p['bwt']:>7.2f} ({p['bwt_std']:.2f}) "
            f"{p['plasticity']:>7.2f} ({p['plasticity_std']:.2f}) {p['final_acc']:>10.2f} {p['forgetting']:>10.2f}"
        )
    if args.out:
        name = json.loads((args.run_dir / "results.json").read_text())["run"]["config"]
        plot(points, args.out, f"PAM over p, {name}")
        print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
