"""Every registered merge rule, checked from its declaration alone (a new rule is covered without a
line of test code): the streaming engine (small chunks, two threads, files) gives exactly what the
rule's own function gives on whole tensors, computed here without the engine."""

from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl.errors import MergeclError
from mergecl.merging import all_rules, merge
from mergecl.merging.registry import RNG_BLOCK, Chunk, Prepared, Rule, TensorInfo
from mergecl.methods.registry import check_method_options, resolve_method

RULE_NAMES = list(all_rules())


def model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big.weight": torch.randn(3 * RNG_BLOCK + 1000, generator=g).reshape(-1, 8).clone()[:-1].reshape(-1),
        "matrix.weight": torch.randn(48, 40, generator=g),
        "bias": torch.randn(40, generator=g),
        "steps": torch.arange(5),  # not floating point: copied from the base
    }


class WholeTensorView:
    """The MergeView of a rule's ``prepare`` with every tensor in one chunk, read from memory."""

    def __init__(self, rule: Rule, base, finetuned, inputs) -> None:
        self.rule, self.base, self.finetuned, self.inputs = rule, base, finetuned, inputs
        self.num_tasks = len(finetuned)

    def one_chunk(self, tensor: TensorInfo) -> bool:
        return True

    def tensors(self) -> list[TensorInfo]:
        return [TensorInfo(k, v.dtype, tuple(v.shape)) for k, v in self.base.items() if v.is_floating_point()]

    def taus(self, key: str):
        taus = [(ft[key] - self.base[key]).reshape(-1) for ft in self.finetuned]
        if self.rule.granularity == "stack":
            return torch.stack(taus)
        if self.rule.granularity == "tensor":
            return iter([tau.reshape(self.base[key].shape) for tau in taus])
        return iter(taus)

    def input_chunks(self, key: str) -> dict[str, Iterator[torch.Tensor]]:
        return {name: iter([state[key].reshape(-1) for state in states]) for name, states in self.inputs.items()}

    def chunks(self, tensors: list[TensorInfo]) -> Iterator[Chunk]:
        for info in tensors:
            yield Chunk(info, 0, info.numel, self.taus(info.key), self.input_chunks(info.key))

    def map(self, fn, tensors: list[TensorInfo]):
        return (fn(chunk) for chunk in self.chunks(tensors))


def reference(rule: Rule, base, finetuned, inputs, seed: int) -> dict[str, torch.Tensor]:
    view = WholeTensorView(rule, base, finetuned, inputs)
    options = rule.options()
    prepared = rule.prepare(view, options) if rule.prepare else Prepared()
    lam = prepared.lam if prepared.lam is not None else rule.lam
    merged = {}
    for info in view.tensors():
        kwargs = dict(options.model_dump())
        kwargs.update(prepared.kwargs(info) if prepared.kwargs else {})
        kwargs.update(view.input_chunks(info.key))
        for name, draw in rule.draws.items():
            kwargs[name] = draw.make(seed, info.key, 0, info.numel, info.numel, len(finetuned))
        tau = rule.fn(view.taus(info.key), **kwargs).reshape(info.shape)
        merged[info.key] = base[info.key].add(tau, alpha=lam)  # theta_0 + lam * tau, rounded once
    return {k: merged.get(k, v) for k, v in base.items()}, prepared.info


@pytest.mark.parametrize("name", RULE_NAMES)
def test_streamed_merge_equals_the_rule_on_whole_tensors(name, tmp_path):
    rule = all_rules()[name]
    count = min(3, rule.max_models or 3)
    base = model(0)
    finetuned = [
        {k: v + 0.1 * (i + 1) * model(i + 1)[k] if v.is_floating_point() else v for k, v in base.items()}
        for i in range(count)
    ]
    inputs = {}
    for j, (input_name, spec) in enumerate(rule.inputs.items()):
        states = [
            {k: model(10 + 3 * j + i)[k].abs() for k, v in base.items() if v.is_floating_point()}
            for i in range(count if spec.per_task else 1)
        ]
        inputs[input_name] = states
    expected, reference_info = reference(rule, base, finetuned, inputs, seed=7)

    given = {k: v if rule.inputs[k].per_task else v[0] for k, v in inputs.items()}
    in_memory = merge(base, finetuned, name, seed=7, chunk_size=RNG_BLOCK, workers=2, **given)
    paths = []
    for i, state in enumerate([base, *finetuned]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    out = merge(paths[0], paths[1:], name, seed=7, chunk_size=RNG_BLOCK, out=tmp_path / "out.safetensors", **given)
    streamed = load_file(out)
    for key, value in expected.items():
        assert in_memory[key].dtype == value.dtype and in_memory[key].shape == value.shape, key
        # bit for bit, but for a coefficient summed over chunks in another order (BECAME's lam*)
        exact = rule.prepare is None or "lambda" not in reference_info
        tolerance = {"rtol": 0, "atol": 0} if exact else {}
        torch.testing.assert_close(in_memory[key], value, **tolerance, msg=lambda m, key=key: f"{name}: {key}: {m}")
        assert torch.equal(streamed[key], in_memory[key]), key


@pytest.mark.parametrize("name", [n for n in RULE_NAMES if all_rules()[n].continual])
def test_a_rule_without_inputs_is_a_continual_method_with_its_options(name):
    rule = all_rules()[name]
    assert resolve_method(name).rule == name and resolve_method(f"ind_ft+{name}").training == "ind"
    defaults = {option: spec.default for option, spec in rule.options.model_fields.items()}
    check_method_options([name, f"ind_ft+{name}"], {name: defaults, f"ind_ft+{name}": {"lam": 0.5}})


PROPAGATING = [n for n in RULE_NAMES if all_rules()[n].propagates_non_finite]


def non_finite_survives(rule: Rule, bad: float) -> bool:
    """A NaN or an infinity in any task vector, first, middle or last, at entries where the other
    task vectors hold large, zero or equal values, leaves those entries of the merged model
    non-finite (and the rest finite)."""
    count = min(3, rule.max_models or 3)
    base = model(0)
    positions = torch.tensor([0, 17, RNG_BLOCK + 5, base["big.weight"].numel() - 1])
    for task in range(count):
        finetuned = [{k: v + 0.1 * model(i + 1)[k] if v.is_floating_point() else v for k, v in base.items()}
                     for i in range(count)]  # fmt: skip
        for other in range(count):
            if other != task:
                finetuned[other]["big.weight"][positions] = base["big.weight"][positions] + 1e30 * (other % 2)
        finetuned[task]["big.weight"][positions] = bad
        merged, _ = reference(rule, base, finetuned, {}, seed=7)
        if torch.isfinite(merged["big.weight"][positions]).any() or not torch.isfinite(merged["matrix.weight"]).all():
            return False
    return True


def test_the_folding_rules_let_the_engine_check_merged_chunks_only():
    assert {"average", "task_arithmetic", "magmax"} <= set(PROPAGATING)
    assert "random_mix" not in PROPAGATING  # a pick drops the other tasks' entries, NaN or not


@pytest.mark.parametrize("name", PROPAGATING)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_rule_that_claims_it_propagates_every_non_finite_entry(name, bad):
    assert non_finite_survives(all_rules()[name], bad)


def test_a_rule_that_drops_entries_does_not_pass_for_one_that_propagates():
    assert not non_finite_survives(all_rules()["random_mix"], float("nan"))  # the check can fail


@pytest.mark.parametrize("name", PROPAGATING)
@pytest.mark.parametrize("lam", [None, 0.0])
def test_a_bad_input_is_still_named_when_only_merged_chunks_are_checked(name, lam, tmp_path):
    base = model(0)
    finetuned = [{k: v + 0.1 * model(i + 1)[k] if v.is_floating_point() else v for k, v in base.items()}
                 for i in range(3)]  # fmt: skip
    finetuned[1]["big.weight"][RNG_BLOCK + 3] = float("nan")
    paths = []
    for i, state in enumerate([base, *finetuned]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    out = tmp_path / "out.safetensors"
    options = {} if lam is None else {"lam": lam}
    with pytest.raises(MergeclError, match=r"m2.safetensors: tensor 'big.weight' has NaN/Inf values"):
        merge(paths[0], paths[1:], name, chunk_size=RNG_BLOCK, out=out, **options)
    assert not out.exists()
    # an entry that overflows only as a task vector: theta - theta_0 = 3e38 - (-3e38) = inf in fp32
    finetuned[1]["big.weight"][RNG_BLOCK + 3] = 3e38
    base["big.weight"][RNG_BLOCK + 3] = -3e38
    with pytest.raises(MergeclError, match=r"tensor 'big.weight' overflows when subtracted from the base"):
        merge(base, finetuned, name, chunk_size=RNG_BLOCK, workers=2, **options)


PICKING = [n for n in RULE_NAMES if all_rules()[n].picks]


def test_random_mix_is_declared_a_pick():
    assert "random_mix" in PICKING and not all_rules()["average"].picks


def draws_of(rule: Rule, key: str, numel: int, num_tasks: int, seed: int = 7) -> dict[str, torch.Tensor]:
    return {name: draw.make(seed, key, 0, numel, numel, num_tasks) for name, draw in rule.draws.items()}


def picks_blind(fn, dtype: torch.dtype, kwargs: dict) -> bool:
    """What the engine relies on: fn(stack) - b == fn(stack - b) for any b per entry, and every
    entry of fn(stack) is one of the stack's at that entry, in the stack's dtype."""
    g = torch.Generator().manual_seed(1)
    stack = torch.randn(4, 2 * RNG_BLOCK, generator=g).to(dtype)
    shift = torch.randn(2 * RNG_BLOCK, generator=g)
    picked = fn(stack.clone(), **kwargs)
    one_of_them = picked.dtype == dtype and bool((stack == picked).any(0).all())
    return one_of_them and torch.equal(picked.float() - shift, fn(stack.float() - shift, **kwargs))


@pytest.mark.parametrize("name", PICKING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rule_that_claims_it_picks_takes_one_input_per_entry_blind_to_the_values(name, dtype):
    rule = all_rules()[name]
    assert picks_blind(rule.fn, dtype, {**rule.options().model_dump(), **draws_of(rule, "w", 2 * RNG_BLOCK, 4)})


def test_a_pick_by_magnitude_fails_the_pick_check():
    def largest_magnitude(taus):  # one input's entry each, but chosen by looking at them
        return taus.gather(0, taus.abs().argmax(0, keepdim=True)).squeeze(0)

    assert not picks_blind(largest_magnitude, torch.float32, {})


def bf16_models(count: int) -> tuple[dict, list[dict]]:
    base = {k: v.bfloat16() if v.is_floating_point() else v for k, v in model(0).items()}
    finetuned = [
        {k: (v.float() + 0.1 * model(i + 1)[k]).bfloat16() if v.is_floating_point() else v for k, v in base.items()}
        for i in range(count)
    ]
    return base, finetuned


@pytest.mark.parametrize("name", PICKING)
def test_a_pick_from_stored_bf16_values_equals_the_pick_from_fp32_task_vectors(name, tmp_path):
    rule = all_rules()[name]
    base, finetuned = bf16_models(3)
    paths = []
    for i, state in enumerate([base, *finetuned]):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, paths[-1])
    out = merge(paths[0], paths[1:], name, seed=7, chunk_size=RNG_BLOCK, workers=2, out=tmp_path / "out.safetensors")
    merged = load_file(out)
    for key, value in base.items():
        if not value.is_floating_point():
            assert torch.equal(merged[key], value)
            continue
        taus = torch.stack([(ft[key].float() - value.float()).reshape(-1) for ft in finetuned])
        kwargs = {**rule.options().model_dump(), **draws_of(rule, key, value.numel(), 3)}
        tau = rule.fn(taus, **kwargs).reshape(value.shape)
        assert torch.equal(merged[key], value.float().add(tau, alpha=rule.lam).bfloat16()), key


@pytest.mark.parametrize("name", PICKING)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pick_still_checks_every_checkpoint_and_names_a_picked_overflow(name, dtype, tmp_path):
    """The unpicked entries are dropped, but a NaN there is still an error naming its file; a task
    vector that overflows fp32 where it is picked is named as the task vectors' own path names it;
    where it is not picked nothing uses it, and the merge is the pick's."""
    rule = all_rules()[name]
    base, finetuned = bf16_models(3)
    cast = lambda state: {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}  # noqa: E731
    base, finetuned = cast(base), [cast(ft) for ft in finetuned]
    numel = base["big.weight"].numel()
    pick = draws_of(rule, "big.weight", numel, 3)["pick"]
    entry = RNG_BLOCK + 3
    unpicked = [t for t in range(3) if t != int(pick[entry])]

    def save(states):
        paths = []
        for i, state in enumerate(states):
            paths.append(tmp_path / f"m{i}.safetensors")
            save_file(state, paths[-1])
        return paths

    nan = [dict(ft) for ft in finetuned]
    nan[unpicked[0]]["big.weight"] = nan[unpicked[0]]["big.weight"].clone()
    nan[unpicked[0]]["big.weight"][entry] = float("nan")
    paths = save([base, *nan])
    out = tmp_path / "out.safetensors"
    with pytest.raises(MergeclError, match=rf"m{unpicked[0] + 1}.safetensors: tensor 'big.weight' has NaN/Inf values"):
        merge(paths[0], paths[1:], name, seed=7, chunk_size=RNG_BLOCK, out=out)
    assert not out.exists()

    huge = [{**ft, "big.weight": ft["big.weight"].clone()} for ft in finetuned]
    far = {**base, "big.weight": base["big.weight"].clone()}
    far["big.weight"][entry] = -3e38
    for state in huge:
        state["big.weight"][entry] = 3e38  # every theta - theta_0 = 3e38 - (-3e38) = inf there
    with pytest.raises(MergeclError, match=r"tensor 'big.weight' overflows when subtracted from the base"):
        merge(far, huge, name, seed=7, chunk_size=RNG_BLOCK, workers=2)
    for t in unpicked:  # only the unpicked ones overflow: the picked one is finite
        huge[t]["big.weight"][entry] = 3e38
    huge[int(pick[entry])]["big.weight"][entry] = -3e38
    merged = merge(far, huge, name, seed=7, chunk_size=RNG_BLOCK, workers=2)
    assert merged["big.weight"][entry] == -3e38 and torch.isfinite(merged["big.weight"]).all()
