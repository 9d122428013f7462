"""Draw the real-data subsets that ship inside mergecl (``src/mergecl/data/embedded/``).

    python scripts/embedded_data.py CLINC150_DIR BANKING77_DIR [OUT_DIR]

CLINC150_DIR holds the official ``data_full.json`` and ``domains.json`` (github clinc/oos-eval);
BANKING77_DIR the official ``train.csv``, ``test.csv`` and ``categories.json``
(github PolyAI-LDN/task-specific-datasets). From each official split, for every intent, a fixed
number of utterances is drawn with ``random.Random(SEED)`` (keyed by split and intent, so the draw
of one intent does not depend on the others) and kept in the official file order. Out-of-scope
examples are dropped. The files keep the official formats, gzipped (the loaders read ``NAME.gz``
when ``NAME`` is absent), so the same loaders read both. Running it again on the same files writes
the same bytes.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import random
import shutil
import sys
from pathlib import Path

SEED = 0
CLINC150_PER_INTENT = {"train": 20, "val": 5, "test": 10}
BANKING77_PER_INTENT = {"train": 20, "test": 10}
OUT = Path(__file__).resolve().parents[1] / "src" / "mergecl" / "data" / "embedded"


def draw(rows: list, label_of, split: str, per_intent: int) -> list:
    """``per_intent`` rows of every label, seeded per (split, label), in the rows' own order."""
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        by_label.setdefault(label_of(row), []).append(i)
    keep: set[int] = set()
    for label, indices in sorted(by_label.items()):
        if len(indices) < per_intent:
            raise SystemExit(f"{split}/{label}: only {len(indices)} rows, {per_intent} wanted")
        keep.update(random.Random(f"{SEED}:{split}:{label}").sample(indices, per_intent))
    return [row for i, row in enumerate(rows) if i in keep]


def write_gzip(path: Path, text: str) -> None:
    path.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))  # mtime 0: same bytes


def clinc150(source: Path, out: Path) -> None:
    data = json.loads((source / "data_full.json").read_text(encoding="utf-8"))
    subset = {split: draw(data[split], lambda row: row[1], split, n) for split, n in CLINC150_PER_INTENT.items()}
    out.mkdir(parents=True, exist_ok=True)
    # one row per line: small, and readable in a diff
    lines = ",\n".join(
        f" {json.dumps(split)}: [\n" + ",\n".join("  " + json.dumps(row, ensure_ascii=False) for row in rows) + "\n ]"
        for split, rows in subset.items()
    )
    write_gzip(out / "data_mini.json.gz", "{\n" + lines + "\n}\n")
    shutil.copyfile(source / "domains.json", out / "domains.json")
    shutil.copyfile(source / "LICENSE", out / "LICENSE")


def banking77(source: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, n in BANKING77_PER_INTENT.items():
        with open(source / f"{split}.csv", encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=["text", "category"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(draw(rows, lambda row: row["category"], split, n))
        write_gzip(out / f"{split}.csv.gz", buffer.getvalue())
    shutil.copyfile(source / "categories.json", out / "categories.json")
    shutil.copyfile(source / "LICENSE", out / "LICENSE")


def main(argv: list[str]) -> None:
    if len(argv) not in (2, 3):
        raise SystemExit(__doc__)
    out = Path(argv[2]) if len(argv) == 3 else OUT  # elsewhere: the test that the draw reproduces
    clinc150(Path(argv[0]), out / "clinc150")
    banking77(Path(argv[1]), out / "banking77")
    for path in sorted(out.rglob("*")):
        if path.is_file():
            print(f"{path.stat().st_size:>8} {path.relative_to(out)}")


if __name__ == "__main__":
    main(sys.argv[1:])
