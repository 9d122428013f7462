"""`mergecl merge` on real Hugging Face directories: the output loads as its base loads
(transformers and sentence-transformers), carries the base's config and tokenizer and a model
card, and checkpoints saved without an integer buffer (transformers 5 drops position_ids) merge."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl.models.text import find_minilm

transformers = pytest.importorskip("transformers")


def run_cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1", MERGECL_QUIET="1")
    return subprocess.run([sys.executable, "-m", "mergecl", *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_a_merged_hf_directory_loads_with_transformers_and_sentence_transformers(tmp_path):
    base = find_minilm()
    weights = load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(0)
    for i in range(2):  # fine-tuned checkpoints as transformers 5 saves them: no position_ids
        tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in weights.items() if v.is_floating_point()}
        save_file(tuned, tmp_path / f"ft{i}.safetensors")
    done = run_cli(
        "merge",
        "--method",
        "magmax",
        "--base",
        str(base),
        "ft0.safetensors",
        "ft1.safetensors",
        "-o",
        "merged",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "embeddings.position_ids" in done.stderr and "taken from the base" in done.stderr
    out = tmp_path / "merged"
    for name in ("config.json", "tokenizer.json", "vocab.txt", "modules.json", "1_Pooling/config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    card = (out / "README.md").read_text()
    assert "magmax" in card and "ft0.safetensors" in card

    merged = load_file(out / "model.safetensors")
    model = transformers.AutoModel.from_pretrained(out)
    assert torch.equal(
        model.state_dict()["encoder.layer.0.attention.self.query.weight"],
        merged["encoder.layer.0.attention.self.query.weight"],
    )
    tokens = transformers.AutoTokenizer.from_pretrained(out)(["book a flight"], return_tensors="pt")
    from sentence_transformers import SentenceTransformer

    sentence = SentenceTransformer(str(out), device="cpu").encode(["book a flight"], convert_to_tensor=True)
    with torch.no_grad():  # the same embedding by hand: mean pooling, then normalisation
        hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(sentence, pooled, rtol=1e-4, atol=1e-5)

    again = run_cli(
        "merge",
        "--method",
        "average",
        "--base",
        str(base),
        "ft0.safetensors",
        "ft1.safetensors",
        "-o",
        "merged",
        "--force",
        cwd=tmp_path,
    )  # its own earlier output, with sub-folders
    assert again.returncode == 0, again.stderr
    assert "average" in (out / "README.md").read_text()


def test_a_missing_float_tensor_is_still_an_error(tmp_path):
    base = find_minilm()
    weights = load_file(base / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "pooler.dense.bias"}, tmp_path / "ft.safetensors")
    done = run_cli("merge", "--method", "average", "--base", str(base), "ft.safetensors", "-o", "m", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(
        "mergecl: error: ft.safetensors: missing tensor 'pooler.dense.bias' (present in the base "
    )
    assert done.stderr.count("\n") == 1
    assert not (tmp_path / "m").exists()
