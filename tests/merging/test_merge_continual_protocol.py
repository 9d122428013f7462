"""`mergecl merge --continual` and `merge_continual`: step s equals a plain merge of the first s
checkpoints (running forms and merges from scratch alike), each checkpoint is read once on the
running path, outputs are checked before the first step and the running state is cleaned up."""

import os
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file, save_file

import mergecl
from mergecl import MergeclError, merge
from mergecl.cli import main
from mergecl.merging import continual
from mergecl.merging.continual import (
    STATE_PREFIX,
    continual_merges,
    merge_continual,
    running_rules,
    step_path,
    uses_running,
)
from mergecl.merging.engine import RNG_BLOCK, _Merge

T = 4


def make_models(t=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "enc.big": torch.randn(RNG_BLOCK * 2 + 123, generator=g),  # several chunks at chunk_size RNG_BLOCK
        "enc.w": torch.randn(12, 10, generator=g),
        "enc.h": torch.randn(8, 10, generator=g).to(torch.bfloat16),
        "enc.d": torch.randn(6, generator=g).double(),
        "steps": torch.tensor([7], dtype=torch.int64),
    }
    fts = []
    for _ in range(t):
        ft = {
            k: v + (0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()
        }
        fts.append(ft)
    return base, fts


def save_all(tmp_path, base, fts):
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, ft in enumerate(fts):
        paths.append(str(tmp_path / f"ft{i + 1}.safetensors"))
        save_file(ft, paths[-1])
    return str(tmp_path / "base.safetensors"), paths


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize(
    ("method", "flags"),
    [
        ("average", []),
        ("magmax", ["--chunk-size", str(RNG_BLOCK), "--workers", "2"]),
        ("task_arithmetic", ["--lam", "0.7", "--dare", "0.3", "--seed", "5", "--exclude", "enc\\.w"]),
        ("opcm", ["--workers", "2"]),  # a sequential tensor rule with a model-wide coefficient: state and norms
        ("ties", ["--keep", "0.3"]),
        ("random_mix", ["--recompute", "--seed", "3"]),
    ],
)
def test_cli_every_step_equals_a_plain_merge_of_the_first_s(tmp_path, capsys, method, flags):
    base, paths = save_all(tmp_path, *make_models())
    out = tmp_path / "steps"
    assert (
        main(["merge", "--continual", "--method", method, "--base", base, "-o", str(out), "--quiet", *paths, *flags])
        == 0
    )
    printed = capsys.readouterr().out
    expected_how = "running state" if method in ("average", "magmax", "task_arithmetic", "opcm") else "from scratch"
    assert expected_how in printed
    plain_flags = [f for f in flags if f != "--recompute"]
    for s in range(1, T + 1):
        plain = tmp_path / f"plain{s}.safetensors"
        assert (
            main(["merge", "--method", method, "--base", base, "-o", str(plain), "--quiet", *paths[:s], *plain_flags])
            == 0
        )
        assert_same(load_file(step_path(out, s) / "model.safetensors"), load_file(plain))
        assert f"wrote {step_path(out, s)}" in printed
    assert sorted(os.listdir(out)) == [f"step{s}" for s in range(1, T + 1)]  # the running state is gone
    assert "ft1.safetensors`, `ft2.safetensors` (in this order)" in (step_path(out, 2) / "README.md").read_text()


def test_the_public_function():
    assert mergecl.merge_continual is merge_continual and "merge_continual" in mergecl.__all__
    assert ">>>" in merge_continual.__doc__


def test_which_rules_run_from_a_state():
    assert uses_running("average") and uses_running("magmax") and uses_running("random_mix")
    assert not uses_running("average", recompute=True)
    assert not uses_running("ties") and not uses_running("fisher") and not uses_running("continual_ties")
    assert uses_running("opcm")  # its coefficient from one norm per task and the state's
    assert running_rules()[:4] == ["average", "task_arithmetic", "magmax", "random_mix"]
    assert uses_running("dop")  # its prepare only names the tensors: its running form gets the names


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "magmax"])
def test_api_in_memory_and_task_vectors(method):
    base, fts = make_models()
    steps = mergecl.merge_continual(base, fts, method)
    assert len(steps) == T
    for s, state in enumerate(steps, 1):
        assert_same(state, merge(base, fts[:s], method))
    taus = [
        {k: (ft[k].float() if ft[k].dtype == torch.bfloat16 else ft[k]) - base[k] for k in ft if k != "steps"}
        for ft in fts
    ]
    assert_same(
        merge_continual(base, taus, method, task_vectors=True)[-1], merge(base, taus, method, task_vectors=True)
    )


def test_each_checkpoint_is_read_once_on_the_running_path_and_s_times_from_scratch(monkeypatch):
    base, fts = make_models()
    reads = Counter()
    original = _Merge._raw

    def counting(self, reader, key, *rest, **kwargs):
        if key == "enc.w" and reader in self.finetuned:
            reads[self.finetuned.index(reader)] += 1
        return original(self, reader, key, *rest, **kwargs)

    monkeypatch.setattr(_Merge, "_raw", counting)
    merge_continual(base, fts, "average")
    assert reads == Counter(dict.fromkeys(range(T), 1))
    reads.clear()
    merge_continual(base, fts, "average", recompute=True)
    assert reads == Counter({t: T - t for t in range(T)})  # checkpoint t is in steps t+1..T


def test_rule_inputs_per_task_are_cut_to_the_first_s(tmp_path):
    base, fts = make_models(t=3)
    g = torch.Generator().manual_seed(1)
    fishers = [{k: torch.rand(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()} for _ in fts]
    steps = merge_continual(base, fts, "fisher", fisher=fishers)
    for s, state in enumerate(steps, 1):
        assert_same(state, merge(base, fts[:s], "fisher", fisher=fishers[:s]))
    with pytest.raises(MergeclError, match="one fisher per fine-tuned checkpoint"):
        merge_continual(base, fts, "fisher", fisher=fishers[:2])


def test_random_mix_running_form_is_a_reservoir_independent_of_chunking():
    base = {"w": torch.zeros(RNG_BLOCK * 3 + 17)}
    fts = [{"w": torch.full_like(base["w"], float(t + 1))} for t in range(T)]
    a = merge_continual(base, fts, "random_mix", seed=2, chunk_size=RNG_BLOCK)
    b = merge_continual(base, fts, "random_mix", seed=2, chunk_size=4 * RNG_BLOCK, workers=2)
    for x, y in zip(a, b, strict=True):
        assert_same(x, y)
    assert torch.equal(a[0]["w"], fts[0]["w"])
    for s, state in enumerate(a, 1):
        values = state["w"]
        assert set(values.unique().tolist()) == set(range(1, s + 1))  # every entry one task's value
        shares = torch.bincount(values.long(), minlength=s + 1)[1:].double() / values.numel()
        assert torch.allclose(shares, torch.full((s,), 1 / s, dtype=torch.float64), atol=0.01)
    # an entry only ever changes to the newest task's value
    for prev, cur, t in zip(a, a[1:], range(2, T + 1), strict=False):
        changed = prev["w"] != cur["w"]
        assert changed.any() and bool((cur["w"][changed] == t).all())
    c = merge_continual(base, fts, "random_mix", seed=3)
    assert not torch.equal(a[-1]["w"], c[-1]["w"])


def test_outputs_are_checked_before_the_first_step(tmp_path, capsys):
    base, paths = save_all(tmp_path, *make_models())
    out = tmp_path / "steps"
    (out / "step3").mkdir(parents=True)
    (out / "step3" / "mine.txt").write_text("not mergecl's")
    with pytest.raises(MergeclError, match="step3: exists and is not an output of mergecl"):
        merge_continual(base, paths, "average", out=out)
    assert sorted(os.listdir(out)) == ["step3"]
    (out / "step3" / "mine.txt").unlink()
    merge_continual(base, paths, "average", out=out)
    with pytest.raises(MergeclError, match="step1: exists .* pass --force"):
        merge_continual(base, paths, "magmax", out=out)
    first = merge_continual(base, paths, "magmax", out=out, force=True)
    assert first == [step_path(out, s) for s in range(1, T + 1)]
    assert_same(load_file(first[-1] / "model.safetensors"), merge(base, paths, "magmax"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(MergeclError, match="not a directory"):
        merge_continual(base, paths, "average", out=tmp_path / "file")
    inside = tmp_path / "other" / "step2"  # an input (an HF directory) where step 2 would go
    inside.mkdir(parents=True)
    os.link(paths[1], inside / "model.safetensors")
    with pytest.raises(MergeclError, match="step2: the output would be, lie inside or contain the input"):
        merge_continual(base, [paths[0], str(inside)], "average", out=tmp_path / "other")
    assert sorted(os.listdir(tmp_path / "other")) == ["step2"]
    assert main(["merge", "--recompute", "--method", "average", "--base", base, "-o", str(out), *paths]) == 2
    assert "--recompute goes with --continual" in capsys.readouterr().err


def test_a_failing_step_leaves_the_earlier_steps_and_no_state(tmp_path):
    base, fts = make_models()
    fts[2]["enc.w"][0, 0] = float("nan")
    base_path, paths = save_all(tmp_path, base, fts)
    out = tmp_path / "steps"
    with pytest.raises(MergeclError, match=r"ft3\.safetensors: tensor 'enc\.w' has NaN/Inf values"):
        merge_continual(base_path, paths, "magmax", out=out)
    assert sorted(os.listdir(out)) == ["step1", "step2"]
    assert_same(load_file(step_path(out, 2) / "model.safetensors"), merge(base, fts[:2], "magmax"))
    assert not any(name.startswith(STATE_PREFIX) for name in os.listdir(out))


def test_a_generator_abandoned_midway_removes_its_state(tmp_path):
    base, paths = save_all(tmp_path, *make_models())
    out = tmp_path / "steps"
    steps = continual_merges(base, paths, "average", out=out)
    next(steps)
    assert any(name.startswith(STATE_PREFIX) for name in os.listdir(out))
    steps.close()
    assert os.listdir(out) == ["step1"]
    assert continual.step_path("x", 3).as_posix() == "x/step3"
