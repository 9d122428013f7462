"""docs/extending.md, "A merge rule": the median rule registered as the page shows it, checked
against torch.median in memory, streamed from files, and through `mergecl --plugin ... merge`."""

import os
import subprocess
import sys

import torch
from docs_snippets import run_section, section_blocks
from safetensors.torch import load_file

CHECK = """
import json
stacked = lambda key: torch.stack([ft[key] - base[key] for ft in finetuned])
for key in base:
    expected = base[key] + torch.median(stacked(key), dim=0).values
    assert torch.equal(merged[key], expected), key
from safetensors.torch import load_file
streamed = load_file(str(path))
assert all(torch.equal(streamed[k], merged[k]) for k in base)
print(json.dumps({"ok": True}))
"""


def test_the_median_rule_of_the_docs_merges_as_torch_median(tmp_path):
    out = run_section("extending.md", "A merge rule", CHECK, tmp_path)
    assert '{"ok": true}' in out
    # the first block is the plugin module as the page shows it: the CLI loads it with --plugin
    (tmp_path / "my_rules.py").write_text(section_blocks("extending.md", "A merge rule")[0], encoding="utf-8")
    files = [str(tmp_path / f"ft{i}.safetensors") for i in range(3)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MERGECL_QUIET="1")
    cli = [sys.executable, "-m", "mergecl", "--plugin", "my_rules.py", "merge", "--method", "median"]
    done = subprocess.run(
        [*cli, "--base", "base.safetensors", *files, "-o", "median-cli.safetensors", "--chunk-size", "65536"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    base = load_file(tmp_path / "base.safetensors")
    finetuned = [load_file(f) for f in files]
    result = load_file(tmp_path / "median-cli.safetensors")
    for key in base:
        taus = torch.stack([ft[key] - base[key] for ft in finetuned])
        assert torch.equal(result[key], base[key] + torch.median(taus, dim=0).values), key
    # without the plugin the rule does not exist: a one-line error, not a traceback
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mergecl",
            "merge",
            "--method",
            "median",
            "--base",
            "base.safetensors",
            *files,
            "-o",
            "x",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and done.stderr.startswith("mergecl: error: unknown merge method 'median'"), done.stderr
