"""Fixtures shared across the test folders."""

import os
from pathlib import Path

import pytest

# The full real data sets: $MERGECL_DATA, else ../shared/data next to the repository (the workspace's).
SHARED_DATA = Path(os.environ.get("MERGECL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def full_data(name: str) -> Path | None:
    """The folder of the full data set ``name``, or None when it is not on this machine. Under CI
    (where the workspace's data is always there) its absence fails the test instead."""
    path = SHARED_DATA / name
    if path.is_dir():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"real data folder {path} is not here (CI must test the full data)")
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The workspace's data folder, for files mergecl does not ship (the ResNet weights): skipped
    where it is absent, required under CI."""
    if not SHARED_DATA.is_dir():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def text_data():
    """``text_data("clinc150")`` -> the run config's ``data`` keys for that real intent data set:
    the full files when this machine has them, else the subset shipped inside mergecl
    (``clinc150_mini``, ``banking77_mini``), so the tests run on real data anywhere."""

    def pick(name: str) -> dict:
        path = full_data(name)
        return {"source": name, "root": str(path)} if path is not None else {"source": f"{name}_mini"}

    return pick


@pytest.fixture(scope="session")
def text_dataset(text_data):
    """``text_dataset("clinc150")`` -> the ``Dataset`` of ``text_data("clinc150")``."""
    from mergecl.data.registry import get_source

    def load(name: str):
        keys = text_data(name)
        return get_source(keys["source"], root=keys.get("root"))

    return load


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random CLIP of the real structure: a real CLIP BPE tokenizer over a character
    vocabulary, saved like a hub checkpoint, and a 2-layer config. Model-spec keys ``config`` and
    ``tokenizer`` (no download)."""
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in "abcdefghijklmnopqrstuvwxyz0123456789.,-'":
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    path = tmp_path_factory.mktemp("tiny_clip_tokenizer")
    transformers.CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(str(path))
    layers = {"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 32}
    text = {**layers, "vocab_size": len(vocab), "max_position_embeddings": 64}
    text.update(bos_token_id=0, eos_token_id=1, pad_token_id=1)
    config = {"text_config": text, "vision_config": {**layers, "image_size": 32, "patch_size": 8}, "projection_dim": 16}
    return {"config": config, "tokenizer": str(path)}
