"""The streaming engine on files and state dicts: equality with in-memory merges, the reference TIES,
dtypes, key selection, every error case, atomic outputs."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergecl import MergeclError, merge
from mergecl.merging import engine, registry, rules, ties
from mergecl.merging.engine import RNG_BLOCK, merge_checkpoints
from mergecl.merging.registry import all_rules

METHODS = ["average", "task_arithmetic", "random_mix", "magmax", "ties", "one_over_t"]


def make_models(t=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {
        "enc.big": torch.randn(RNG_BLOCK * 2 + 123, generator=g).to(dtype),  # spans several chunks
        "enc.w": torch.randn(40, 30, generator=g).to(dtype),
        "enc.b": torch.randn(30, generator=g).to(dtype),
        "head.w": torch.randn(5, 30, generator=g).to(dtype),
        "steps": torch.tensor([7], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    fts = []
    for _ in range(t):
        ft = {
            k: (v + 0.1 * torch.randn(v.shape, generator=g).to(dtype)) if v.is_floating_point() else v + 1
            for k, v in base.items()
            if k != "mask"
        }
        ft["mask"] = base["mask"].clone()
        fts.append(ft)
    return base, fts


def save_all(tmp_path, base, fts):
    save_file(base, str(tmp_path / "base.safetensors"))
    paths = []
    for i, ft in enumerate(fts):
        paths.append(str(tmp_path / f"ft{i}.safetensors"))
        save_file(ft, paths[-1])
    return str(tmp_path / "base.safetensors"), paths


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def flat_taus(base, fts, keys):
    return torch.stack([torch.cat([(ft[k].float() - base[k].float()).reshape(-1) for k in keys]) for ft in fts])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dare", [0.0, 0.3])
def test_streaming_from_files_equals_in_memory_bit_for_bit(tmp_path, method, dare):
    base, fts = make_models()
    base_path, ft_paths = save_all(tmp_path, base, fts)
    in_memory = merge(base, fts, method, dare=dare, seed=3)
    out = tmp_path / "merged.safetensors"
    # the smallest chunk: every tensor is read in many pieces
    merge(base_path, ft_paths, method, dare=dare, seed=3, out=out, chunk_size=RNG_BLOCK)
    assert_same(in_memory, load_file(str(out)))


@pytest.mark.parametrize("method, options", [*((m, {}) for m in METHODS), ("ties", {"scope": "tensor"})])
def test_threaded_merge_equals_the_sequential_one_bit_for_bit(tmp_path, method, options):
    base, fts = make_models(t=4)
    base["enc.big2"] = torch.randn(RNG_BLOCK * 3 + 5)
    for i, ft in enumerate(fts):
        ft["enc.big2"] = base["enc.big2"] + 0.1 * torch.randn(
            RNG_BLOCK * 3 + 5, generator=torch.Generator().manual_seed(i)
        )
    base_path, ft_paths = save_all(tmp_path, base, fts)
    sequential = merge(base_path, ft_paths, method, seed=3, chunk_size=RNG_BLOCK, dare=0.2, workers=1, **options)
    out = tmp_path / "threaded.safetensors"
    merge(base_path, ft_paths, method, seed=3, chunk_size=RNG_BLOCK, dare=0.2, workers=3, out=out, **options)
    assert_same(sequential, load_file(str(out)))
    assert_same(sequential, merge(base, fts, method, seed=3, chunk_size=RNG_BLOCK, dare=0.2, workers=2, **options))


def test_a_failing_chunk_in_a_threaded_merge_names_the_tensor_and_writes_nothing(tmp_path):
    base, fts = make_models()
    fts[1]["enc.big"][RNG_BLOCK + 7] = float("nan")
    base_path, ft_paths = save_all(tmp_path, base, fts)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeclError, match="enc.big") as failed:
        merge(base_path, ft_paths, "magmax", out=out, chunk_size=RNG_BLOCK, workers=2)
    assert not out.exists()
    assert failed.traceback and torch.get_num_threads() == threads_before  # the pool ended with the error
    with pytest.raises(MergeclError, match="workers"):
        merge(base, fts, "magmax", workers=0)
    assert torch.get_num_threads() == threads_before  # the pool's single-threaded torch is undone


threads_before = torch.get_num_threads()


def test_chunked_rules_use_a_thread_per_core_and_whole_tensor_rules_torchs_threads(monkeypatch):

    seen = {}

    def pipeline(jobs, compute, workers):
        seen["workers"] = workers
        seen.setdefault("every pass", []).append(workers)
        seen["torch threads"] = []
        for chunk in original(jobs, compute, workers):
            seen["torch threads"].append(torch.get_num_threads())
            yield chunk

    original = engine._pipeline
    monkeypatch.setattr(engine, "_pipeline", pipeline)
    base, fts = make_models()
    torch.set_num_threads(2)
    try:
        merge(base, fts, "magmax")
        assert seen["workers"] == 2 and set(seen["torch threads"]) == {1}  # one core per chunk thread
        merge(base, fts, "tsv_m")
        assert seen["workers"] == 1 and set(seen["torch threads"]) == {2}  # SVDs on torch's threads
        merge(base, fts, "magmax", workers=3)
        assert seen["workers"] == 3
        seen.clear()  # a tensor's own TIES thresholds: passes nested in the merge pass, threaded as well
        monkeypatch.setattr(engine, "WHOLE_BUDGET", RNG_BLOCK)  # enc.big streamed, not whole
        merge(base, fts, "ties", scope="tensor", chunk_size=RNG_BLOCK)
        assert len(seen["every pass"]) > 1 and set(seen["every pass"]) == {2}
        torch.set_num_threads(1)  # e.g. OMP_NUM_THREADS=1: the user gave the merge one core
        merge(base, fts, "magmax")
        assert seen["workers"] == 1
    finally:
        torch.set_num_threads(threads_before)
    assert torch.get_num_threads() == threads_before


def test_ties_global_matches_the_released_algorithm(tmp_path):
    base, fts = make_models(t=4)
    keys = [k for k in base if base[k].is_floating_point()]
    taus = flat_taus(base, fts, keys)
    d = taus.shape[1]
    kth = taus.abs().kthvalue(d - int(0.2 * d), dim=1, keepdim=True).values
    trimmed = taus * (taus.abs() >= kth)
    sign = torch.sign(trimmed.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
    expected = selected.sum(0) / (selected != 0).sum(0).clamp(min=1)

    result = merge_checkpoints(base, fts, "ties", chunk_size=RNG_BLOCK)
    assert result.info["thresholds"] == [float(v) for v in kth[:, 0]]  # the exact k-th values
    got = flat_taus(base, [result.state], keys)[0] / 0.55
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got != 0, expected != 0)


def wide_models(t=3, tensors=12):
    """Models of several tensors of two chunks and more each (at chunk_size RNG_BLOCK): no one of
    them is a large part of the model, so TIES per tensor may hold one whole (its budget is at most
    the model's bytes)."""
    g = torch.Generator().manual_seed(5)
    base = {f"w{i}": torch.randn(RNG_BLOCK * 2 + 123, generator=g) for i in range(tensors)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(t)]
    return base, fts


def recording_ties(monkeypatch) -> list:
    """The shapes of the [T, n] chunks the TIES rule is called with, from now on."""
    seen = []
    rule = registry.RULES["ties"]
    fn = rule.fn
    wrapped = dataclasses.replace(rule, fn=lambda taus, **kw: seen.append(tuple(taus.shape)) or fn(taus, **kw))
    monkeypatch.setitem(registry.RULES, "ties", wrapped)
    return seen


@pytest.mark.parametrize("streamed", [False, True])
def test_ties_tensor_scope_matches_rule_per_tensor(monkeypatch, streamed):
    seen = recording_ties(monkeypatch)
    if streamed:  # in pieces, each tensor's own threshold and majority sign found by streaming passes
        monkeypatch.setattr(engine, "WHOLE_BUDGET", 0)
    base, fts = wide_models()
    merged = merge(base, fts, "ties", scope="tensor", keep=0.3, lam=1.0, chunk_size=RNG_BLOCK, workers=2)
    assert max(n for _, n in seen) == (RNG_BLOCK if streamed else base["w0"].numel())
    for key in base:
        tau = ties.ties([ft[key] - base[key] for ft in fts], keep=0.3)
        assert torch.allclose(merged[key], base[key] + tau, atol=1e-6), key


def test_whole_tensors_stay_within_their_memory_budget_over_every_thread_and_one_model(monkeypatch):
    """TIES per tensor takes a tensor whole only while its T + 2 rows, in every merge thread at
    once, fit WHOLE_BUDGET and the model's own bytes: with more threads, or in a model it dominates,
    it is streamed in chunks (memory stays bounded)."""
    seen = recording_ties(monkeypatch)
    base, fts = wide_models()  # T = 3: 5 rows of 4 bytes; 12 tensors: 48 bytes per entry in the model
    numel = base["w0"].numel()
    monkeypatch.setattr(engine, "WHOLE_BUDGET", 5 * numel * 4 * 2)  # 2 threads' worth
    whole = merge(base, fts, "ties", scope="tensor", chunk_size=RNG_BLOCK, workers=2)
    assert set(seen) == {(3, numel)}
    seen.clear()
    streamed = merge(base, fts, "ties", scope="tensor", chunk_size=RNG_BLOCK, workers=3)
    assert max(n for _, n in seen) == RNG_BLOCK
    assert all(torch.allclose(whole[k], streamed[k], atol=1e-6) for k in whole)
    seen.clear()
    monkeypatch.setattr(engine, "WHOLE_BUDGET", 1 << 40)
    merge({"w0": base["w0"]}, [{"w0": ft["w0"]} for ft in fts], "ties", scope="tensor", chunk_size=RNG_BLOCK)
    assert max(n for _, n in seen) == RNG_BLOCK  # 5 rows of the model's only tensor: more than the model


def test_each_rule_against_its_pure_function():
    base, fts = make_models()
    taus = [ft["enc.w"] - base["enc.w"] for ft in fts]
    expected = {
        "average": base["enc.w"] + rules.average(taus),
        "task_arithmetic": base["enc.w"] + 0.3 * rules.task_arithmetic(taus),
        "magmax": base["enc.w"] + 0.5 * rules.magmax(taus),
        "one_over_t": base["enc.w"] + rules.one_over_t(taus),
    }
    for method, want in expected.items():
        assert torch.allclose(merge(base, fts, method)["enc.w"], want, atol=1e-6), method
    mixed = merge(base, fts, "random_mix")["enc.w"]
    assert bool(((torch.stack([ft["enc.w"] for ft in fts]) - mixed).abs() < 1e-6).any(0).all())


def test_fisher_and_became_merges():
    base, fts = make_models(t=2)
    floats = [k for k in base if base[k].is_floating_point()]
    g = torch.Generator().manual_seed(1)
    fishers = [{k: torch.rand(base[k].shape, generator=g) for k in floats} for _ in fts]
    got = merge(base, fts, "fisher", fisher=fishers)
    taus = [ft["enc.w"] - base["enc.w"] for ft in fts]
    want = base["enc.w"] + rules.fisher_weighted(taus, [f["enc.w"] for f in fishers])
    assert torch.allclose(got["enc.w"], want, atol=1e-6)

    result = merge_checkpoints(base, fts[:1], "became", fisher=fishers[0], prior_precision=fishers[1])
    delta = flat_taus(base, fts[:1], floats)[0].double()
    f = torch.cat([fishers[0][k].reshape(-1) for k in floats]).double()
    prior = torch.cat([fishers[1][k].reshape(-1) for k in floats]).double()
    lam = float((f * delta**2).sum() / ((f + prior) * delta**2).sum())
    assert abs(result.info["lambda"] - lam) < 1e-9
    assert torch.allclose(result.state["enc.w"], base["enc.w"] + lam * taus[0], atol=1e-6)


def test_non_float_buffers_come_from_the_base_and_selection_works():
    base, fts = make_models()
    merged = merge(base, fts, "average", exclude=r"^head\.")
    assert torch.equal(merged["steps"], base["steps"]) and torch.equal(merged["mask"], base["mask"])
    assert torch.equal(merged["head.w"], base["head.w"])
    assert not torch.equal(merged["enc.w"], base["enc.w"])
    only = merge(base, fts, "average", include=r"\.b$")
    assert torch.equal(only["enc.w"], base["enc.w"]) and not torch.equal(only["enc.b"], base["enc.b"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_output_keeps_each_tensors_dtype_and_computes_in_fp32(tmp_path, dtype):
    base, fts = make_models(dtype=dtype)
    base_path, ft_paths = save_all(tmp_path, base, fts)
    out = tmp_path / "m.safetensors"
    merge(base_path, ft_paths, "average", out=out)
    merged = load_file(str(out))
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    want = base["enc.w"].to(compute) + sum(ft["enc.w"].to(compute) - base["enc.w"].to(compute) for ft in fts) / 3
    assert merged["enc.w"].dtype == dtype
    assert torch.equal(merged["enc.w"], want.to(dtype)) or torch.allclose(
        merged["enc.w"].double(), want.to(dtype).double(), rtol=0, atol=float(torch.finfo(dtype).eps) * 8
    )


def test_metadata_sharded_output_and_sharded_input(tmp_path):
    base, fts = make_models()
    base_path, ft_paths = save_all(tmp_path, base, fts)
    out_dir = tmp_path / "merged"
    merge(base_path, ft_paths, "magmax", out=out_dir, max_shard_size="300KB")
    index = json.loads((out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out_dir.iterdir() if p.suffix == ".safetensors")
    assert len(shards) >= 2 and set(index["weight_map"].values()) == set(shards)
    with safe_open(str(out_dir / shards[0]), "pt") as f:
        meta = f.metadata()
    assert meta["mergecl_method"] == "magmax" and json.loads(meta["mergecl_options"])["lam"] == 0.5
    assert json.loads(meta["mergecl_inputs"]) == [
        "base.safetensors",
        "ft0.safetensors",
        "ft1.safetensors",
        "ft2.safetensors",
    ]
    # the sharded directory reads back as a checkpoint: merging it with itself is the identity
    again = merge(out_dir, [out_dir, out_dir], "average")
    assert_same(again, merge(base, fts, "magmax"))


def test_pt_inputs_load_with_weights_only(tmp_path):
    base, fts = make_models(t=2)
    torch.save({"state_dict": base}, tmp_path / "base.pt")  # a wrapper is unwrapped
    for i, ft in enumerate(fts):
        torch.save(ft, tmp_path / f"ft{i}.bin")
    got = merge(tmp_path / "base.pt", [tmp_path / "ft0.bin", tmp_path / "ft1.bin"], "average")
    assert_same(got, merge(base, fts, "average"))


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    base, fts = make_models(t=1)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": Evil()}, f, protocol=2)  # torch.save's protocol: no warning about the protocol
    with pytest.raises(MergeclError, match=r"evil\.pt: refused to load.*weights_only=True"):
        merge(base, [path], "average")


def error_of(tmp_path, base, fts, method="average", **options):
    base_path, ft_paths = save_all(tmp_path, base, fts)
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeclError) as info:
        merge(base_path, ft_paths, method, out=out, **options)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_key_is_an_error_naming_tensor_and_file(tmp_path):
    base, fts = make_models(t=2)
    del fts[1]["enc.b"]
    assert error_of(tmp_path, base, fts) == (
        f"{tmp_path}/ft1.safetensors: missing tensor 'enc.b' (present in the base {tmp_path}/base.safetensors)"
    )


def test_extra_key_is_an_error(tmp_path):
    base, fts = make_models(t=2)
    fts[0]["surprise"] = torch.zeros(2)
    assert "ft0.safetensors: tensor 'surprise' is not in the base" in error_of(tmp_path, base, fts)


def test_shape_mismatch_is_an_error(tmp_path):
    base, fts = make_models(t=2)
    fts[1]["enc.w"] = torch.zeros(30, 40)
    msg = error_of(tmp_path, base, fts)
    assert "ft1.safetensors: tensor 'enc.w' has shape [30, 40], the base has [40, 30]" in msg


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_are_an_error_even_where_the_rule_would_hide_them(tmp_path, method, bad):
    base, fts = make_models(t=2)
    fts[1]["enc.big"][RNG_BLOCK + 5] = bad  # in the second chunk
    msg = error_of(tmp_path, base, fts, method, chunk_size=RNG_BLOCK)
    assert msg.endswith("ft1.safetensors: tensor 'enc.big' has NaN/Inf values")


def test_non_finite_base_is_blamed_on_the_base(tmp_path):
    base, fts = make_models(t=2)
    base["head.w"][0, 0] = float("nan")
    assert error_of(tmp_path, base, fts).endswith("base.safetensors: tensor 'head.w' has NaN/Inf values")


def test_bad_options_are_clear_errors():
    base, fts = make_models(t=2)
    cases = {
        "unknown merge method 'maxmag'": dict(method="maxmag"),
        "ties.keep: Input should be greater than 0, got 0.0": dict(method="ties", keep=0.0),
        "ties.scope: Input should be 'global' or 'tensor', got 'layer'": dict(method="ties", scope="layer"),
        "magmax: unknown option 'keep'": dict(method="magmax", keep=0.5),
        "average.include: not a valid regular expression": dict(method="average", include="(("),
        "no floating-point tensor is selected": dict(method="average", include="nothing-matches"),
        "computes its own coefficient": dict(method="became", lam=0.3),
        "needs one fisher per fine-tuned checkpoint (0 given)": dict(method="fisher"),
        "magmax.lam: Input should be a finite number": dict(method="magmax", lam=float("nan")),
        "lam must be a finite number of at most": dict(method="magmax", lam=1e39),
    }
    for message, kwargs in cases.items():
        with pytest.raises(MergeclError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            merge(base, fts, **kwargs)


def test_negative_fisher_is_refused():
    base, fts = make_models(t=1)
    fisher = {k: -torch.ones(v.shape) for k, v in base.items() if v.is_floating_point()}
    with pytest.raises(MergeclError, match="has negative values"):
        merge(base, fts, "fisher", fisher=[fisher])


def test_missing_and_corrupt_files(tmp_path):
    base, fts = make_models(t=1)
    with pytest.raises(MergeclError, match="nope.safetensors: no such file"):
        merge(base, [tmp_path / "nope.safetensors"], "average")
    (tmp_path / "junk.safetensors").write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{{{{{")
    with pytest.raises(MergeclError, match="junk.safetensors: not a valid safetensors file"):
        merge(base, [tmp_path / "junk.safetensors"], "average")
    save_file(fts[0], str(tmp_path / "short.safetensors"))
    data = (tmp_path / "short.safetensors").read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[:-100])
    with pytest.raises(MergeclError, match="short.safetensors: tensor '.*' is truncated"):
        merge(base, [tmp_path / "short.safetensors"], "average")


def test_rules_registry_matches_the_spec_defaults():
    rules_ = all_rules()
    assert rules_["magmax"].lam == 0.5 and rules_["ties"].lam == 0.55 and rules_["random_mix"].lam == 1.0
    assert rules_["became"].lam is None


def test_inputs_are_not_modified():
    base, fts = make_models()
    copies = [{k: v.clone() for k, v in sd.items()} for sd in [base, *fts]]
    for method in METHODS:
        merge(base, fts, method)
    for original, copy in zip([base, *fts], copies, strict=True):
        assert_same(original, copy)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "mergecl", *args], capture_output=True, text=True)


def test_cli_merge_and_errors(tmp_path):
    base, fts = make_models(t=2)
    base_path, ft_paths = save_all(tmp_path, base, fts)
    out = tmp_path / "m.safetensors"
    done = run_cli("merge", "--method", "ties", "--keep", "0.5", "--base", base_path, "-o", str(out), *ft_paths)
    assert done.returncode == 0, done.stderr
    assert_same(load_file(str(out)), merge(base, fts, "ties", keep=0.5))
    fts[1]["enc.w"][0, 0] = float("nan")
    save_file(fts[1], ft_paths[1])
    bad = run_cli("merge", "--method", "magmax", "--base", base_path, "-o", str(tmp_path / "x.safetensors"), *ft_paths)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"mergecl: error: {ft_paths[1]}: tensor 'enc.w' has NaN/Inf values"
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_takes_yes_no_rule_options_as_true_or_false(tmp_path):
    base, fts = make_models(t=2)
    base_path, ft_paths = save_all(tmp_path, base, fts)
    out = tmp_path / "dop.safetensors"
    done = run_cli(
        "merge", "--method", "dop", "--mgda", "false", "--ema", "no", "--base", base_path, "-o", str(out), *ft_paths
    )
    assert done.returncode == 0, done.stderr
    assert_same(load_file(str(out)), merge(base, fts, "dop", mgda=False, ema=False))
    bad = run_cli("merge", "--method", "dop", "--mgda", "maybe", "--base", base_path, "-o", str(out), *ft_paths)
    assert bad.returncode == 2 and "expected true or false, got 'maybe'" in bad.stderr


def test_cli_help_lists_every_rule_and_default():
    done = run_cli("merge", "--help")
    assert done.returncode == 0
    for name in all_rules():
        assert name in done.stdout
    assert "[0.5] Each entry takes" in done.stdout and "[0.55] trim" in done.stdout and "--keep" in done.stdout


def test_an_integer_buffer_missing_from_a_fine_tuned_checkpoint_comes_from_the_base(capfd):
    # transformers 5 no longer saves BERT's position_ids: such checkpoints still merge with the base
    base = {"w": torch.zeros(4), "embeddings.position_ids": torch.arange(4)}
    finetuned = [{"w": torch.full((4,), float(i + 1))} for i in range(2)]
    merged = merge(base, finetuned, "average")
    assert torch.equal(merged["embeddings.position_ids"], torch.arange(4))
    assert torch.equal(merged["w"], torch.full((4,), 1.5))
    assert "embeddings.position_ids" in capfd.readouterr().err
    with pytest.raises(MergeclError, match=r"finetuned\[0\]: missing tensor 'w'"):  # a float tensor is never guessed
        merge(base, [{"embeddings.position_ids": torch.arange(4)}], "average")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_checkpoint_in_the_compute_dtype_is_read_straight_into_the_computes_buffers(tmp_path, dtype):
    """fp32 (the rule's dtype): base and theta_t land in the base and tau buffers themselves, with no
    staging buffer and no copy (the buffers a fold touches then fit the core's cache); bf16 is read
    into a buffer of its own and widened. The task vectors are the same either way."""
    from mergecl.merging.checkpoints import open_checkpoint
    from mergecl.progress import bar

    base, fts = make_models(2, dtype=dtype)
    base_path, (ft0_path, ft1_path) = save_all(tmp_path, base, fts)
    rule = registry.get_rule("average")
    with (
        open_checkpoint(base_path, "base") as base_reader,
        open_checkpoint(ft0_path, "ft0") as ft0,
        open_checkpoint(ft1_path, "ft1") as ft1,
        bar(0, "test", enabled=False) as progress,
    ):
        job = engine._Merge(
            rule, engine.read_merge_options("average", {}), base_reader, [ft0, ft1], {}, progress, False
        )
        entry = next(e for e in job.entries if e.key == "enc.w")
        chunk = job._read_chunk(entry, 0, entry.numel)
        taus = [tau.clone() for tau in chunk.taus]
        slots = set(job.buffers._local.__dict__)
    for ft, tau in zip(fts, taus, strict=True):
        assert torch.equal(tau, (ft["enc.w"].float() - base["enc.w"].float()).reshape(-1))
    staged = {slot for slot in slots if slot[0] == "raw"}
    assert staged == (set() if dtype == torch.float32 else {("raw", "base"), ("raw", "theta")})


def test_a_fold_with_more_buffers_of_its_own_gets_smaller_forked_chunks():
    """The forked pass sizes a fold's chunks so that its fp32 buffers (the base, the task vector and
    the rule's declared ``fold_buffers``) fit ``FORKED_CACHE``: MagMax's three at 64K entries."""
    assert engine.forked_chunk(registry.get_rule("average")) == engine.FORKED_CHUNK
    assert registry.get_rule("magmax").fold_buffers == 3
    assert engine.forked_chunk(registry.get_rule("magmax")) == RNG_BLOCK
    assert (2 + 3) * 4 * RNG_BLOCK <= engine.FORKED_CACHE < (2 + 3) * 4 * 2 * RNG_BLOCK
    assert engine.forked_chunk(registry.get_rule("random_mix")) == engine.FORKED_CHUNK  # a stack rule
