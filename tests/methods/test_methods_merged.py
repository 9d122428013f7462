"""The merged model of a merge method after step t: lam chosen on validation (lam: auto), the seed of
rules that draw, the merge space, on tiny stored task vectors."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl.errors import MergeclError
from mergecl.merging.engine import merge
from mergecl.methods.merged import TaskVectors, _along, choose_lam, merged_model, needs_seed
from mergecl.training.loop import NonFiniteError

BASE = {"w": torch.zeros(2), "steps": torch.tensor([3])}  # an integer entry is never merged


def stored(tmp_path, *taus):
    paths = []
    for i, tau in enumerate(taus):
        paths.append(tmp_path / f"task{i}.safetensors")
        save_file({"w": torch.tensor(tau)}, paths[-1])
    return TaskVectors(paths, BASE, ["w"], lambda path: load_file(str(path)))


def never(state):
    raise AssertionError("validation is only for lam: auto")


def test_lam_auto_picks_the_grid_point_with_the_best_validation_score(tmp_path):
    vectors = stored(tmp_path, [1.0, 0.0], [0.0, 1.0])  # their average: [0.5, 0.5]
    seen = []

    def validate(state):  # best model: w = [0.2, 0.2], i.e. lam 0.4; one accuracy per task seen
        seen.append(state["w"][0].item())
        return [100 - abs(state["w"][0].item() - 0.2), 100 - abs(state["w"][1].item() - 0.2)]

    merged = merged_model("average", vectors, {"lam": "auto", "lam_grid": [0.2, 1.0, 0.4, 0.6]}, 0, validate)
    assert merged.info == {"lam": 0.4}
    assert merged.state["w"].tolist() == pytest.approx([0.2, 0.2]) and merged.state["steps"].tolist() == [3]
    assert seen == pytest.approx([0.1, 0.5, 0.2, 0.3])  # every grid point's model was scored


def test_lam_auto_ties_go_to_the_smaller_lam(tmp_path):
    vectors = stored(tmp_path, [1.0, 0.0], [0.0, 1.0])
    merged = merged_model("average", vectors, {"lam": "auto", "lam_grid": [1.0, 0.6, 0.3]}, 0, lambda s: [50.0])
    assert merged.info == {"lam": 0.3} and merged.state["w"].tolist() == pytest.approx([0.15, 0.15])


def test_lam_auto_default_grid_is_tenths(tmp_path):
    vectors = stored(tmp_path, [1.0, 0.0])
    merged = merged_model("average", vectors, {"lam": "auto"}, 0, lambda s: [-abs(s["w"][0].item() - 0.7)])
    assert merged.info["lam"] == pytest.approx(0.7)


def test_a_lam_that_breaks_the_model_is_never_chosen_unless_all_do():
    def score(lam):
        if lam > 0.5:
            raise NonFiniteError("the model's outputs are not finite")
        return lam  # the larger the better, but the largest lams break

    assert choose_lam([0.1, 0.5, 0.9, 1e37], score) == 0.5
    assert choose_lam([0.9, 0.7], score) == 0.7  # every lam breaks: the smaller one


def test_a_fixed_lam_is_the_engines_merge_and_no_validation(tmp_path):
    vectors = stored(tmp_path, [1.0, 0.0], [0.0, 3.0])
    merged = merged_model("task_arithmetic", vectors, {"lam": 0.5}, 0, never)
    expected = merge({"w": BASE["w"]}, list(vectors.paths), "task_arithmetic", task_vectors=True, lam=0.5)
    assert torch.equal(merged.state["w"], expected["w"]) and merged.info == {}


def test_rules_that_draw_get_the_run_seed_unless_the_options_give_one(tmp_path):
    assert needs_seed("random_mix", {}) and needs_seed("magmax", {"dare": 0.3})
    assert not needs_seed("magmax", {}) and not needs_seed("ties", {"dare": 0.0})
    g = torch.Generator().manual_seed(0)
    vectors = stored(tmp_path, torch.randn(64, generator=g).tolist(), torch.randn(64, generator=g).tolist())
    vectors = TaskVectors(vectors.paths, {"w": torch.zeros(64)}, ["w"], vectors.load)

    def mix(seed, options):
        return merged_model("random_mix", vectors, options, seed, never).state["w"]

    assert torch.equal(mix(1, {}), mix(1, {})) and not torch.equal(mix(1, {}), mix(2, {}))
    assert torch.equal(mix(1, {"seed": 7}), mix(2, {"seed": 7}))


def test_the_merge_space_is_checked(tmp_path):
    vectors = stored(tmp_path, [1.0, 0.0])
    with pytest.raises(MergeclError, match=r"method_options\.m\.space: expected factors or dense, got 'x'"):
        merged_model("average", vectors, {"space": "x"}, 0, never, "method_options.m")
    with pytest.raises(MergeclError, match=r"method_options\.m\.space: dense needs a LoRA model"):
        merged_model("average", vectors, {"space": "dense"}, 0, never, "method_options.m")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_lam_sweeps_models_are_theta_0_plus_lam_times_the_direction_rounded_as_written(dtype):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50_000, generator=g).to(dtype), "steps": torch.arange(3)}
    direction = {"w": 0.01 * torch.randn(50_000, generator=g)}
    for lam in (0.1, 0.3, 0.55, 1.0):
        model = _along(base, direction, lam)
        expected = (base["w"].float() + lam * direction["w"]).to(dtype)  # lam * d rounded, then the sum
        assert torch.equal(model["w"], expected) and model["steps"] is base["steps"]
