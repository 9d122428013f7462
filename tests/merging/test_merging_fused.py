"""The fused fold steps (merging/fused.c): the same bits as torch's ops, the same errors, and torch's
ops wherever the library cannot be had."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl.errors import MergeclError
from mergecl.merging import all_rules, fused, merge
from mergecl.merging.registry import RNG_BLOCK, Running, register_rule

FUSED = [name for name, rule in all_rules().items() if rule.fused]
needs_compiler = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler on this machine")


@pytest.fixture
def native(monkeypatch, tmp_path):
    """switch(True/False) turns the fused steps on or off for the merges that follow (a fresh cache)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def switch(on: bool) -> bool:
        monkeypatch.setenv("MERGECL_FUSED", "1" if on else "0")
        fused.library.cache_clear()
        return fused.library() is not None

    yield switch
    monkeypatch.delenv("MERGECL_FUSED")
    fused.library.cache_clear()


def models(dtype: torch.dtype, count: int = 4) -> tuple[dict, list[dict]]:
    """A base and fine-tuned checkpoints with what rounding could get wrong: ties of opposite signs,
    entries no task moved, -0.0 in the base and the checkpoints, subnormals and large values."""
    g = torch.Generator().manual_seed(0)
    n = 3 * RNG_BLOCK + 77
    base = {"w": (torch.randn(n, generator=g) * 0.02).to(dtype), "b": torch.randn(40, generator=g).to(dtype),
            "steps": torch.arange(3)}  # fmt: skip
    big = torch.finfo(dtype).max / 8
    base["w"][:8] = torch.tensor([0.0, -0.0, -0.0, 1e-39, -1e-39, big, -big, 0.5]).to(dtype)
    finetuned = []
    for t in range(count):
        w = (base["w"].float() + 0.01 * torch.randn(n, generator=g)).to(dtype)
        w[:8] = base["w"][:8]  # unmoved, -0.0 included
        w[8] = base["w"][8] + (0.25 if t % 2 else -0.25)  # ties of opposite signs
        w[9] = -0.0 if t % 2 else 0.0
        finetuned.append({"w": w, "b": (base["b"].float() + 0.1 * t).to(dtype), "steps": torch.arange(3)})
    return base, finetuned


def merged_files(tmp_path, name: str, dtype: torch.dtype, tag: str, **options) -> dict[str, torch.Tensor]:
    base, finetuned = models(dtype)
    paths = []
    for i, state in enumerate([base, *finetuned]):
        paths.append(tmp_path / f"{tag}{i}.safetensors")
        save_file(state, paths[-1])
    out = tmp_path / f"{tag}-out.safetensors"
    merge(paths[0], paths[1:], name, chunk_size=RNG_BLOCK, workers=2, out=out, **options)
    return load_file(out)


def test_the_folding_rules_and_random_mix_declare_their_fused_steps():
    assert set(FUSED) >= {"average", "task_arithmetic", "magmax", "random_mix"}
    assert all(all_rules()[name].fused in (*fused.STEPS, "pick") for name in FUSED)
    assert all_rules()["random_mix"].fused == "pick"


@needs_compiler
@pytest.mark.parametrize("seed", [0, 7, 5489, 2**32 - 1, 123456789])
@pytest.mark.parametrize("high", [1, 2, 3, 7, 8, 13, 255, 256])
def test_the_fused_draws_are_torchs(seed, high, native):
    """fused.c's MT19937 gives torch.randint's values from the same seed, across its 624-word
    refills, for powers of two (a mask) and others (a remainder by multiplication)."""
    assert native(True)
    for n in (1, 624, 625, 70_000):
        picks = torch.empty(n, dtype=torch.uint8)
        fused.draw_tasks(picks, seed, high)
        expected = torch.randint(high, (n,), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(picks.long(), expected), (seed, high, n)


@needs_compiler
@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_fused_fold_gives_the_bits_of_torchs_ops(name, dtype, tmp_path, native):
    assert native(True)
    with_fused = merged_files(tmp_path, name, dtype, "on")
    assert not native(False)
    with_torch = merged_files(tmp_path, name, dtype, "off")
    assert with_fused.keys() == with_torch.keys()
    for key, value in with_torch.items():
        assert torch.equal(with_fused[key].view(torch.uint8), value.view(torch.uint8)), (name, key)


@needs_compiler
def test_the_fused_steps_are_what_the_engine_runs(tmp_path, native, monkeypatch):
    """The engine goes through them where it can (bf16 and fp32 checkpoints, fp32 compute) and not
    where it cannot (fp16 checkpoints)."""
    assert native(True)
    calls = []
    real = fused.step
    monkeypatch.setattr(fused, "step", lambda name, *args: calls.append(name) or real(name, *args))
    merged_files(tmp_path, "magmax", torch.bfloat16, "bf16")
    assert calls.count("first") == 5 and calls.count("magmax") == 15  # 5 chunks of "w" and "b", 4 tasks
    calls.clear()
    merged_files(tmp_path, "magmax", torch.float16, "fp16")
    assert calls == []
    picked = []
    real_pick = fused.pick
    monkeypatch.setattr(fused, "pick", lambda *args: picked.append(args[-1]) or real_pick(*args))
    merged_files(tmp_path, "random_mix", torch.bfloat16, "mix")
    assert sorted(picked) == sorted([0, 1, 2, 3] * 5)


@needs_compiler
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_bad_input_is_still_named_with_fused_steps(bad, tmp_path, native):
    assert native(True)
    base, finetuned = models(torch.bfloat16)
    finetuned[2]["w"][RNG_BLOCK + 3] = bad
    paths = []
    for i, state in enumerate([base, *finetuned]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    for name in FUSED:
        with pytest.raises(MergeclError, match=r"m3.safetensors: tensor 'w' has NaN/Inf values"):
            merge(paths[0], paths[1:], name, chunk_size=RNG_BLOCK, out=tmp_path / "out.safetensors")
        assert not (tmp_path / "out.safetensors").exists()


def test_without_a_compiler_the_engine_uses_torchs_ops(tmp_path, native, monkeypatch):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert not native(True)
    assert not (tmp_path / "cache" / "mergecl").exists() or not any((tmp_path / "cache" / "mergecl").iterdir())
    merged = merged_files(tmp_path, "magmax", torch.bfloat16, "x")
    assert torch.isfinite(merged["w"].float()).all()


@needs_compiler
def test_a_library_others_could_write_is_not_loaded(tmp_path, native):
    assert native(True)
    (library,) = (tmp_path / "cache" / "mergecl").glob("fused-*.so")
    os.chmod(library, 0o777)
    assert not native(True)
    os.chmod(library, 0o755)
    assert native(True)


def test_fused_must_name_a_step_of_a_rule_that_propagates_with_a_running_form():
    running = Running(lambda state, tau, t, g: state.add_(tau))
    with pytest.raises(MergeclError, match="fused must name a step of fused.c"):
        register_rule("fused_typo", lambda taus: next(iter(taus)), running=running, propagates_non_finite=True,
                      fused="summ")  # fmt: skip
    with pytest.raises(MergeclError, match="fused must name a step of fused.c"):
        register_rule("fused_no_running", lambda taus: next(iter(taus)), propagates_non_finite=True, fused="sum")
    with pytest.raises(MergeclError, match="fused must name a step of fused.c"):
        register_rule("fused_drops", lambda taus: next(iter(taus)), running=running, fused="sum")
    assert not {"fused_typo", "fused_no_running", "fused_drops"} & set(all_rules())
