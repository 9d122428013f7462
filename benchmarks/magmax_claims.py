"""The MagMax paper's claims (docs/methods.md#magmax-paper-claims, (a)-(e)) checked against a finished suite run.

Prints, from RUN_DIR/results.json, the numbers each claim rests on (final ACC, BWT, mean (std) over
seeds) and a verdict computed by a stated rule, so that docs/results/*.md quote a reproducible check:

    python benchmarks/magmax_claims.py runs/clinc150-cil

Rules: (a) Seq-FT's BWT < -5 points. (b) Seq-FT+MagMax's final ACC above Seq-FT, LwF, EWC and each
other merge of Seq-FT vectors. (c) each rule's final ACC on Seq-FT vectors above the same rule on
Ind-FT vectors. (d) average and random mix within 2 points of MagMax's final ACC. (e) MagMax at the
fixed lam 0.5 within 1 point of MagMax with lam chosen on validation at every step.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from mergecl.merging.registry import get_rule

RULES = ("magmax", "average", "task_arithmetic", "random_mix", "ties")


def cell(entry: dict, key: str) -> str:
    value, std = entry.get(key), (entry.get("std") or {}).get(key)
    if value is None:
        return "-"
    return f"{value:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def claims(methods: dict) -> list[tuple[str, str, bool]]:
    def acc(name: str) -> float:
        return methods[name]["final_acc"]

    out = []
    seq = methods["seq_ft"]
    out.append(("(a) Seq-FT forgets heavily", f"Seq-FT BWT {cell(seq, 'bwt')}", seq["bwt"] < -5))
    rivals = [m for m in ("seq_ft", "lwf", "ewc", *RULES[1:]) if m in methods]
    beaten = [m for m in rivals if acc("magmax") > acc(m)]
    detail = f"MagMax {cell(methods['magmax'], 'final_acc')}; " + ", ".join(
        f"{m} {cell(methods[m], 'final_acc')}" for m in rivals
    )
    out.append(("(b) Seq-FT+MagMax beats Seq-FT, LwF, EWC, other merges", detail, len(beaten) == len(rivals)))
    pairs = [(r, f"ind_ft+{r}") for r in RULES if r in methods and f"ind_ft+{r}" in methods]
    wins = [r for r, i in pairs if acc(r) > acc(i)]
    detail = "; ".join(f"{r} {acc(r):.2f} vs {acc(i):.2f}" for r, i in pairs)
    out.append(
        (
            f"(c) Seq-FT vectors beat Ind-FT vectors ({len(wins)}/{len(pairs)} rules)",
            detail,
            wins == [r for r, _ in pairs],
        )
    )
    strong = [r for r in ("average", "random_mix") if r in methods]
    detail = "; ".join(f"{r} {cell(methods[r], 'final_acc')}" for r in strong) + f"; MagMax {acc('magmax'):.2f}"
    out.append(
        ("(d) average and random mix are surprisingly strong", detail, all(acc(r) >= acc("magmax") - 2 for r in strong))
    )
    if "magmax@auto" in methods:
        auto = methods["magmax@auto"]
        lams = auto.get("step_info", {}).get("lam", [])
        detail = (
            f"lam 0.5: {cell(methods['magmax'], 'final_acc')}; auto: {cell(auto, 'final_acc')}; "
            f"chosen lam per step (mean over seeds): {', '.join(f'{v:.2f}' for v in lams)}"
        )
        out.append(("(e) lam = 0.5 is robust", detail, abs(acc("magmax") - auto["final_acc"]) <= 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    methods = json.loads((args.run_dir / "results.json").read_text())["methods"]
    print("| claim | numbers (final ACC / BWT, mean ± std over seeds) | by the rule |")
    print("|---|---|---|")
    for claim, detail, holds in claims(methods):
        print(f"| {claim} | {detail} | {'holds' if holds else 'does not hold'} |")
    rows = [(name, e) for name, e in methods.items() if name.endswith("@auto")]
    options = (yaml.safe_load((args.run_dir / "config.yaml").read_text()) or {}).get("method_options") or {}
    if rows:
        print("\n| rule | fixed lam | final ACC | BWT | lam auto: final ACC | BWT | chosen lam, last step |")
        print("|---|---|---|---|---|---|---|")
        for name, auto in rows:
            rule = name.split("@")[0]
            fixed = methods.get(rule, {})
            lam = (options.get(rule) or {}).get("lam", get_rule(rule).lam)
            lams = auto.get("step_info", {}).get("lam", [None])
            last = f"{lams[-1]:.2f}" if lams[-1] is not None else "-"
            print(
                f"| {rule} | {lam:g} | {cell(fixed, 'final_acc')} | {cell(fixed, 'bwt')} | "
                f"{cell(auto, 'final_acc')} | {cell(auto, 'bwt')} | {last} |"
            )


if __name__ == "__main__":
    main()
