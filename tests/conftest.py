"""Fixtures shared across the test folders."""

import pytest


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
