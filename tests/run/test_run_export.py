"""`mergecl export` (and a config's `export:` key): a run's model as a directory that loads without
mergecl, holding exactly the weights the run evaluated.

The journey of README.md's section "Your data in, your model out" is run as the README writes it
(its YAML, its commands and its Python are read from the README): the real Banking77 subset shipped
in the package as a CSV, a class-incremental run of the packaged all-MiniLM-L6-v2, the MagMax model
exported, loaded with transformers and with sentence-transformers, and its predictions on the test
split give the run's own per-task accuracies exactly; `mergecl eval` gives them too. The faster
tests export a digits MLP run (every kind of method, every step, LoRA folded in).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from mergecl.cli import main
from mergecl.data.registry import get_source
from mergecl.errors import MergeclError
from mergecl.experiment.config import parse_config
from mergecl.experiment.evaluate import evaluate
from mergecl.experiment.export import HEAD_INFO, HEAD_WEIGHTS, export, read_head
from mergecl.experiment.runner import run
from mergecl.models.factory import build_learner

ROOT = Path(__file__).resolve().parents[2]
SECTION = "Your data in, your model out"


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, re.S)


def intents_csv(path: Path, classes: int) -> list[str]:
    """The Banking77 subset shipped with mergecl, its first ``classes`` intents, as the CSV the README
    describes (text, label, split). Returns the class names."""
    real = get_source("banking77_mini", seed=0)
    lines = ["text,label,split"]
    for split, part in (("train", real.train), ("validation", real.val), ("test", real.test)):
        for text, label in zip(part.inputs, part.labels.tolist(), strict=True):
            if label < classes:
                quoted = '"' + text.replace('"', '""') + '"'
                lines.append(f"{quoted},{real.class_names[label]},{split}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return real.class_names[:classes]


def mergecl(command: str) -> tuple[int, str, float]:
    """A README command line run in-process: (exit status, stdout, seconds)."""
    argv = shlex.split(command, comments=True)
    assert argv[0] == "mergecl", command
    out = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out):
        code = main(argv[1:])
    return code, out.getvalue(), time.perf_counter() - started


def test_the_readme_journey_your_data_in_your_model_out(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERGECL_QUIET", "1")
    section = readme_section(SECTION)
    (yaml_text,) = code_blocks(section, "yaml")
    config_name = yaml_text.splitlines()[0].removeprefix("#").strip()  # "# intents.yaml"
    Path(config_name).write_text(yaml_text, encoding="utf-8")
    csv_name = re.search(r"root: ([\w.]+)", yaml_text)[1]
    intents_csv(Path(csv_name), classes=8)

    commands = [line for block in code_blocks(section, "bash") for line in block.splitlines() if line.strip()]
    run_line, export_line, eval_line, merge_line = commands
    timings = {}
    for line in (run_line, export_line, merge_line):
        code, _, timings[line.split()[1]] = mergecl(line)
        assert code == 0, line
    code, printed, timings["eval"] = mergecl(eval_line)
    assert code == 0
    print("README journey, seconds per command:", {k: round(v, 1) for k, v in timings.items()})

    run_dir = Path(shlex.split(run_line)[shlex.split(run_line).index("--out") + 1])
    out = Path(shlex.split(export_line)[shlex.split(export_line).index("-o") + 1])
    results = json.loads((run_dir / "results.json").read_text())
    expected = results["methods"]["magmax"]["accuracy_matrix"][-1]
    info = json.loads((out / HEAD_INFO).read_text())
    assert info["method"] == "magmax" and info["step"] == 2 and info["format"] == "standalone"

    # as a user would: transformers, mean pooling + normalisation, the head file
    model = transformers.AutoModel.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    head = load_file(out / HEAD_WEIGHTS)["weight"]
    scale = info["head"]["scale"]
    class_of = {name: i for i, name in enumerate(info["class_names"])}
    test = [line for line in Path(csv_name).read_text().splitlines()[1:] if line.endswith(",test")]
    texts = [line.rsplit(",", 2)[0].strip('"').replace('""', '"') for line in test]
    labels = torch.tensor([class_of[line.rsplit(",", 2)[1]] for line in test])
    features = []
    with torch.no_grad():
        for start in range(0, len(texts), 32):
            batch = tokenizer(
                texts[start : start + 32], padding=True, truncation=True, max_length=128, return_tensors="pt"
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            features.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
    features = torch.cat(features)
    predicted = (scale * features @ head.T).argmax(-1)  # the last step has seen every class: all columns
    accuracies = [
        100.0 * float((predicted[mask] == labels[mask]).float().mean())
        for mask in (torch.isin(labels, torch.tensor(task["classes"])) for task in info["tasks"])
    ]
    assert accuracies == pytest.approx(expected, abs=1e-9), (accuracies, expected)

    # sentence-transformers loads the same directory: the same features, the same predictions
    sentence = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    embedded = sentence.encode(texts, convert_to_tensor=True, batch_size=32)
    torch.testing.assert_close(embedded, features, rtol=1e-4, atol=1e-5)
    assert torch.equal((embedded @ head.T).argmax(-1), predicted)

    # mergecl eval: the same per-task accuracies (printed, and through the API)
    for accuracy in expected:
        assert f"{accuracy:8.2f}" in printed
    assert evaluate(out, config_name).accuracies == expected

    # the config's export key wrote the same model at the end of the run; the hand merge of the
    # README gives the same weights under mergecl's own tensor names
    exported = load_file(out / "model.safetensors")
    by_key = load_file(run_dir / "export" / "magmax" / "model.safetensors")
    by_hand = load_file(shlex.split(merge_line)[shlex.split(merge_line).index("-o") + 1])
    assert exported.keys() == by_key.keys()
    for key, value in exported.items():
        assert torch.equal(value, by_key[key]), key
        assert torch.equal(value, by_hand[f"encoder.model.{key}"]), key
    assert torch.equal(by_hand["head.weight"], head)
    card = (out / "README.md").read_text()
    assert "magmax" in card and f"{expected[0]:.2f}" in card

    # the README's Python, as it is
    (python,) = code_blocks(section, "python")
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        exec(compile(python, "README.md", "exec"), {})
    assert shown.getvalue().strip() in info["class_names"]


# --- a digits MLP run: every kind of method, every step -------------------------------------------


def digits_config(**extra) -> dict:
    config = {
        "name": "digits-export",
        "seeds": [0, 1],
        "data": {"source": "digits", "scenario": "class", "n_tasks": 3},
        "model": {"name": "mlp", "in_dim": 64, "hidden": [32]},
        "train": {"epochs": 3, "lr": 3.0e-3, "batch_size": 32},
        "methods": ["zero_shot", "seq_ft", "magmax", "magmax@auto", "random_mix"],
        "method_options": {"magmax@auto": {"lam": "auto", "lam_grid": [0.3, 0.7]}},
    }
    return {**config, **extra}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "run"
    results, path = run(parse_config(digits_config()), out=out, report=False, echo=lambda message: None)
    return results, path


def accuracies_from_files(directory: Path, seed: int, step: int) -> list[float]:
    """The per-task accuracies of an exported encoder + head, computed without the runner."""
    info, head = read_head(directory)
    config = parse_config(digits_config())
    from mergecl.experiment.runner import run_scenario
    from mergecl.methods.trainings import eval_classes

    scenario = run_scenario(config, seed)
    encoder = build_learner(info["model"], info["class_names"]).encoder
    encoder.load_state_dict(load_file(directory / "model.safetensors"))
    encoder.eval()
    row = []
    with torch.no_grad():
        for i, task in enumerate(scenario.tasks):
            logits = head(encoder(task.test.inputs))
            columns = torch.tensor(eval_classes(scenario, step - 1, i))
            predicted = columns[logits[:, columns].argmax(1)]
            row.append(100.0 * float((predicted == task.test.labels).float().mean()))
    return row


def test_an_export_reproduces_every_row_the_run_evaluated(digits_run, tmp_path):
    results, path = digits_run
    progress = json.loads((path / "progress.json").read_text())
    for method in ("zero_shot", "seq_ft", "magmax", "magmax@auto", "random_mix"):
        for seed, step in ((0, 3), (1, 2)):
            done = export(path, method, tmp_path / f"{method}-{seed}-{step}", seed=seed, step=step)
            assert (done.seed, done.step, done.num_steps, done.standalone) == (seed, step, 3, False)
            row = progress["seeds"][str(seed)]["rows"][method][step - 1]
            assert accuracies_from_files(done.path, seed, step) == pytest.approx(row, abs=1e-9), (method, seed, step)
            assert evaluate(done.path, parse_config(digits_config()), seed=seed).accuracies == row
    info = json.loads((tmp_path / "magmax@auto-0-3" / HEAD_INFO).read_text())
    assert info["head"]["type"] == "linear" and info["format"] == "encoder_state"
    chosen = progress["seeds"]["0"]["method_info"]["magmax@auto"]["2"]["lam"]
    assert chosen in (0.3, 0.7)  # taken from the run's record, not chosen again
    default = export(path, "magmax", tmp_path / "default")
    assert (default.seed, default.step) == (0, 3)  # the first seed, the last step
    marker = json.loads((default.path / ".mergecl-output").read_text())
    assert sorted(marker["files"]) == ["README.md", HEAD_INFO, HEAD_WEIGHTS, "model.safetensors"]


def test_export_errors_are_one_line(digits_run, tmp_path, capsys):
    _, path = digits_run
    cases = [
        (["--method", "ties"], "no method 'ties' in this run (its methods: zero_shot, seq_ft, magmax"),
        (["--method", "magmax", "--seed", "5"], "seed 5 is not a seed of this run (its seeds: [0, 1])"),
        (["--method", "magmax", "--step", "4"], "step 4: out of range; magmax on seed 0 of"),
        (["--method", "magmax", "--step", "0"], "step 0: out of range"),
    ]
    for flags, message in cases:
        assert main(["export", str(path), *flags, "-o", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mergecl: error: ") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "x").exists()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for force in ([], ["--force"]):
        assert main(["export", str(path), "--method", "magmax", "-o", str(foreign), *force]) == 2
        err = capsys.readouterr().err
        assert "exists and is not an output of mergecl" in err and err.count("\n") == 1
    assert (foreign / "notes.txt").read_text() == "mine"
    own = tmp_path / "own"
    assert main(["export", str(path), "--method", "seq_ft", "-o", str(own)]) == 0
    assert "wrote seq_ft (seed 0, step 3 of 3)" in capsys.readouterr().out
    assert main(["export", str(path), "--method", "magmax", "-o", str(own)]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["export", str(path), "--method", "magmax", "-o", str(own), "--force"]) == 0
    assert json.loads((own / HEAD_INFO).read_text())["method"] == "magmax"
    with pytest.raises(MergeclError, match="no such run directory"):
        export(tmp_path / "nothing", "magmax", tmp_path / "y")


def test_the_export_key_exports_before_keep_vectors_false_deletes_the_tensors(tmp_path, capsys):
    config = parse_config(digits_config(seeds=[0], keep_vectors=False, export={"methods": ["magmax", "seq_ft"]}))
    results, path = run(config, out=tmp_path / "run", report=False, echo=lambda message: None)
    assert not (path / "seed0").exists()
    for method in ("magmax", "seq_ft"):
        row = results["methods"][method]["accuracy_matrix"][-1]
        assert accuracies_from_files(path / "export" / method, 0, 3) == pytest.approx(row, abs=1e-9)
    assert "export:" in (path / "config.yaml").read_text()
    assert "exported magmax (seed 0, step 3 of 3)" in (path / "logs" / "run.log").read_text()
    assert main(["export", str(path), "--method", "magmax", "-o", str(tmp_path / "late")]) == 2
    err = capsys.readouterr().err
    assert "keep_vectors: false" in err and "`export: [magmax]`" in err and err.count("\n") == 1
    # a run without the key records its config as before (no export key in its files)
    plain = digits_config(name="plain", seeds=[0], methods=["seq_ft"], method_options={}, data={"n_tasks": 2})
    plain = parse_config(plain)
    _, other = run(plain, out=tmp_path / "plain", report=False, echo=lambda message: None)
    assert "export" not in yaml.safe_load((other / "config.yaml").read_text())
    assert "export" not in json.loads((other / "mergecl-run.json").read_text())["config"]
    assert not (other / "export").exists()


def test_lora_adapters_are_folded_into_a_plain_model(tmp_path):
    from mergecl.experiment.runner import Runner

    model = {"name": "mlp", "in_dim": 64, "hidden": [32], "lora": {"rank": 4, "target_modules": ["layers.0"]}}
    config = parse_config(digits_config(seeds=[0], methods=["seq_ft", "magmax"], method_options={}, model=model))
    results, path = run(config, out=tmp_path / "run", report=False, echo=lambda message: None)
    done = export(path, "magmax", tmp_path / "magmax")
    info = json.loads((done.path / HEAD_INFO).read_text())
    assert "lora" not in info["model"]
    assert sorted(load_file(done.path / "model.safetensors")) == ["layers.0.bias", "layers.0.weight"]  # no adapter
    row = results["methods"]["magmax"]["accuracy_matrix"][-1]
    assert evaluate(done.path, config).accuracies == pytest.approx(row, abs=1e-9)
    # Seq-FT's trained adapter, folded (peft's merge): the plain layer computes what the adapted one did
    seq = export(path, "seq_ft", tmp_path / "seq")
    tau = load_file(path / "seed0" / "seq" / "task2.safetensors")
    assert float(tau["encoder.layers.0.lora_B.default.weight"].abs().sum()) > 0
    adapted = build_learner(config.model, info["class_names"])
    adapted.load_state_dict(Runner.rebuild(load_file(path / "seed0" / "base.safetensors"), tau))
    plain = build_learner(info["model"], info["class_names"]).encoder
    plain.load_state_dict(load_file(seq.path / "model.safetensors"))
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), adapted.encoder.eval()(x))


def test_hf_clip_exports_a_clip_model_with_the_trained_image_tower(tiny_clip, tmp_path):
    transformers = pytest.importorskip("transformers")
    from mergecl.models.clip import export_hf_clip
    from mergecl.models.registry import check_model_spec

    base = tmp_path / "clip"
    torch.manual_seed(0)
    transformers.CLIPModel(transformers.CLIPConfig(**tiny_clip["config"])).save_pretrained(base)
    transformers.CLIPTokenizer.from_pretrained(tiny_clip["tokenizer"]).save_pretrained(base)
    spec = check_model_spec({"name": "hf_clip", "pretrained": str(base), "head": "linear"})
    learner = build_learner(spec, ["cat", "dog"])
    with torch.no_grad():
        for parameter in learner.encoder.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    standalone = export_hf_clip(spec, learner.encoder.state_dict())
    assert "CLIPModel" in standalone.loads_with and standalone.files_from == base
    model = transformers.CLIPModel(transformers.CLIPConfig(**tiny_clip["config"])).eval()
    model.load_state_dict(standalone.weights)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=pixels).pooler_output
        mine = torch.nn.functional.normalize(model.visual_projection(pooled), dim=-1)
        torch.testing.assert_close(mine, learner.encoder.eval()(pixels))
        text_before = transformers.CLIPModel.from_pretrained(base).text_model.embeddings.token_embedding.weight
        assert torch.equal(model.text_model.embeddings.token_embedding.weight, text_before)
