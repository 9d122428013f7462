"""Merges on a device (``device: cuda``): the device stage's code (pinned buffers, transfers, the
one-chunk lag, checks read with the chunk) run on the CPU through ``engine.STAGE_CPU``, every rule
against the default path; the errors; and, where a GPU is lent, a real CUDA merge against the CPU."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl import MergeclError, merge
from mergecl.merging import engine
from mergecl.merging.device import Staging, resolve_device
from mergecl.merging.registry import RNG_BLOCK, all_rules

RULES = sorted(all_rules())
NO_CUDA = not torch.cuda.is_available()


def make_models(t=3, dtype=torch.float32):
    """A base and ``t`` fine-tuned state dicts: a tensor of three chunks, a matrix, a bias, an int buffer."""
    g = torch.Generator().manual_seed(0)
    base = {
        "enc.big": torch.randn(RNG_BLOCK * 2 + 123, generator=g).to(dtype),
        "enc.w": torch.randn(24, 16, generator=g).to(dtype),
        "enc.b": torch.randn(16, generator=g).to(dtype),
        "steps": torch.tensor([7], dtype=torch.int64),
    }
    fts = [
        {
            k: v + 0.1 * torch.randn(v.shape, generator=g).to(dtype) if v.is_floating_point() else v
            for k, v in base.items()
        }
        for _ in range(t)
    ]
    return base, fts


def save(tmp_path, name, state):
    path = tmp_path / f"{name}.safetensors"
    save_file(state, str(path))
    return str(path)


def rule_arguments(tmp_path, name, base, fts):
    """The fine-tuned files and the rule's input files (random non-negative tensors) for rule ``name``."""
    rule = all_rules()[name]
    count = rule.max_models or len(fts)
    g = torch.Generator().manual_seed(1)
    inputs = {}
    for key, spec in rule.inputs.items():
        states = [
            {k: torch.rand(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()}
            for _ in range(count if spec.per_task else 1)
        ]
        paths = [save(tmp_path, f"{key}{i}", state) for i, state in enumerate(states)]
        inputs[key] = paths if spec.per_task else paths[0]
    return [save(tmp_path, f"ft{i}", ft) for i, ft in enumerate(fts[:count])], inputs


@pytest.fixture
def staged(monkeypatch):
    """CPU merges through the device stage; the list of the chunks it brought back."""
    monkeypatch.setattr(engine, "STAGE_CPU", True)
    landed = []
    download = Staging.download
    monkeypatch.setattr(Staging, "download", lambda self, *args: landed.append(1) or download(self, *args))
    return landed


def on_the_default_path(monkeypatch, *args, **options):
    with monkeypatch.context() as patch:
        patch.setattr(engine, "STAGE_CPU", False)
        return merge(*args, **options)


@pytest.mark.parametrize("name", RULES)
def test_every_rule_gives_the_default_paths_result_through_the_device_stage(tmp_path, monkeypatch, staged, name):
    base, fts = make_models()
    base_path = save(tmp_path, "base", base)
    ft_paths, inputs = rule_arguments(tmp_path, name, base, fts)
    options = dict(chunk_size=RNG_BLOCK, seed=3, **inputs)
    want = on_the_default_path(monkeypatch, base_path, ft_paths, name, **options)
    out = tmp_path / "staged.safetensors"
    merge(base_path, ft_paths, name, out=out, **options)
    chunks = 3 if all_rules()[name].granularity == "tensor" else 5  # enc.big in 3 chunks, or whole
    assert len(staged) == chunks  # every merged chunk came back through the stage
    got = load_file(str(out))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name, options", [("task_arithmetic", {}), ("ties", {"scope": "tensor"}), ("random_mix", {})])
def test_dare_and_in_memory_inputs_through_the_device_stage(monkeypatch, staged, name, options):
    base, fts = make_models(dtype=torch.bfloat16)
    options = dict(chunk_size=RNG_BLOCK, seed=5, dare=0.3, **options)
    want = on_the_default_path(monkeypatch, base, fts, name, **options)
    got = merge(base, fts, name, **options)
    assert len(staged) == 5 and all(torch.equal(got[k], want[k]) for k in want)


NAN_CASES = [("magmax", "enc.big", RNG_BLOCK + 5), ("ties", "enc.big", RNG_BLOCK + 5), ("tsv_m", "enc.w", 7)]


@pytest.mark.parametrize("name, key, index", NAN_CASES)
def test_a_nan_still_names_the_tensor_and_the_file_and_nothing_is_written(tmp_path, staged, name, key, index):
    base, fts = make_models()
    fts[1][key].view(-1)[index] = float("nan")  # enc.big: in its second chunk; enc.w: an SVD rule's matrix
    ft_paths = [save(tmp_path, f"ft{i}", ft) for i, ft in enumerate(fts)]
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MergeclError, match=rf"ft1\.safetensors: tensor '{key}' has NaN/Inf values$"):
        merge(save(tmp_path, "base", base), ft_paths, name, out=out, chunk_size=RNG_BLOCK)
    assert not out.exists()


def test_overflow_and_a_negative_input_are_found_on_the_device_path(staged):
    base, fts = make_models(t=2, dtype=torch.float16)
    with pytest.raises(MergeclError, match=r"tensor 'enc.big': the merged values overflow torch.float16$"):
        merge(base, fts, "task_arithmetic", lam=1e6, chunk_size=RNG_BLOCK)
    fisher = [{k: torch.rand(v.shape) for k, v in base.items() if v.is_floating_point()} for _ in fts]
    fisher[1]["enc.b"][3] = -1.0
    with pytest.raises(MergeclError, match=r"fisher\[1\]: tensor 'enc.b' has negative values"):
        merge(base, fts, "fisher", fisher=fisher)


@pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here")
def test_cuda_without_cuda_is_a_one_line_error():
    base, fts = make_models(t=2)
    for device in ("cuda", "cuda:1"):
        with pytest.raises(MergeclError, match=rf"^device {device}: CUDA is not available here .*; use cpu$"):
            merge(base, fts, "average", device=device)
    with pytest.raises(MergeclError, match=r"average.device: expected cpu, cuda or cuda:N, got 'gpu'"):
        merge(base, fts, "average", device="gpu")


def test_a_device_merge_runs_in_one_thread(staged):
    base, fts = make_models(t=2)
    with pytest.raises(MergeclError, match="workers goes with device cpu"):
        merge(base, fts, "average", workers=2)


@pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here")
def test_cli_device_cuda_without_cuda_exits_with_one_line_and_writes_nothing(tmp_path):
    base, fts = make_models(t=2)
    ft_paths = [save(tmp_path, f"ft{i}", ft) for i, ft in enumerate(fts)]
    out = tmp_path / "merged.safetensors"
    args = ["merge", "--method", "average", "--device", "cuda", "--base", save(tmp_path, "base", base), "-o", str(out)]
    done = subprocess.run([sys.executable, "-m", "mergecl", *args, *ft_paths], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"mergecl: error: device cuda: CUDA is not available here (torch {torch.__version__}); use cpu"
    ]
    assert not out.exists()


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("name", RULES)
def test_a_cuda_merge_equals_the_cpu_merge_up_to_rounding(tmp_path, name):
    count = torch.cuda.device_count()
    with pytest.raises(MergeclError, match=rf"^device cuda:{count}: this machine has {count} CUDA device"):
        resolve_device(f"cuda:{count}")
    base, fts = make_models()
    base_path = save(tmp_path, "base", base)
    ft_paths, inputs = rule_arguments(tmp_path, name, base, fts)
    options = dict(chunk_size=RNG_BLOCK, seed=3, dare=0.2, **inputs)
    cpu = merge(base_path, ft_paths, name, **options)
    cuda = merge(base_path, ft_paths, name, device="cuda", **options)
    for key in cpu:
        torch.testing.assert_close(cuda[key], cpu[key], rtol=1e-4, atol=1e-4, msg=f"{name}: {key}")


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_a_continual_running_merge_on_cuda_asks_for_recompute():
    from mergecl import merge_continual

    base, fts = make_models(t=2)
    with pytest.raises(MergeclError, match="running form of a continual merge computes on the CPU"):
        merge_continual(base, fts, "average", device="cuda")
    assert len(merge_continual(base, fts, "average", device="cuda", recompute=True)) == 2
