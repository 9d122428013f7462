"""Writes continual_reference.safetensors: outputs of the authors' released code for FusionBench's
continual merging methods (continual TIES, continual task arithmetic, continual weight average) and
DOP, read by tests/merging/test_merging_continual.py.

Usage: python tests/merging/data/make_continual_reference.py <git dir of github.com/tanganke/fusion_bench>

It extracts the release's own files at commit COMMIT (git show) into a temporary folder and RUNS
them: the ``run`` methods of ``ContinualTiesMergingForCLIP``, ``ContinualTaskArithmeticForCLIP``,
``ContinualWeightAverageForCLIP`` (fusion_bench/method/opcm/{ties_merging,task_arithmetic,
weight_average}.py) and ``ContinualDOPForCLIP`` (fusion_bench/method/dop/dop.py), with the helper
modules they import (ties_merging_utils, simple_average, state_dict_arithmetic, models/utils,
parameters, dop/min_norm_solvers, dop/utils) as released. Only the package plumbing they import
for logging, config and evaluation (BaseAlgorithm, the mixins, lightning, omegaconf, the task pool)
is stubbed; models arrive in the given order (shuffle_order false), nothing is saved or evaluated.

Models: ``Net`` below (fc1 8x6 + bias, LayerNorm(8), fc2 4x8 + bias), base = torch.manual_seed(0)
and the default init; task t (0..3) = every parameter + 0.01 (t + 1) randn (generator seeded 1);
f32, and the same numbers in f64.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import types
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

COMMIT = "54c9e8c9d9621620c720452cd8533332a32d3689"
REAL = [
    "fusion_bench/method/opcm/ties_merging.py",
    "fusion_bench/method/opcm/task_arithmetic.py",
    "fusion_bench/method/opcm/weight_average.py",
    "fusion_bench/method/ties_merging/ties_merging_utils.py",
    "fusion_bench/method/dop/dop.py",
    "fusion_bench/method/dop/min_norm_solvers.py",
    "fusion_bench/method/dop/utils.py",
    "fusion_bench/method/simple_average.py",
    "fusion_bench/utils/state_dict_arithmetic.py",
    "fusion_bench/utils/parameters.py",
    "fusion_bench/utils/type.py",
    "fusion_bench/utils/dict.py",
    "fusion_bench/models/utils.py",
]
OUT = Path(__file__).with_name("continual_reference.safetensors")


class BaseAlgorithm:
    def __init__(self, **kwargs):
        pass


class Fabric:
    world_size = 1

    def to_device(self, x):
        return x


class Mixin:  # LightningFabricMixin and SimpleProfilerMixin: no logging, no profiling
    log_dir = None
    fabric = Fabric()

    @contextmanager
    def profile(self, name):
        yield

    def print_profile_summary(self):
        pass


STUBS = {
    "fusion_bench": {
        "BaseAlgorithm": BaseAlgorithm,
        "BaseModelPool": object,
        "auto_register_config": lambda cls: cls,
    },
    "fusion_bench.method": {},
    "fusion_bench.method.opcm": {},
    "fusion_bench.method.ties_merging": {},
    "fusion_bench.method.dop": {},
    "fusion_bench.method.base_algorithm": {"BaseAlgorithm": BaseAlgorithm},
    "fusion_bench.mixins": {
        "LightningFabricMixin": Mixin,
        "SimpleProfilerMixin": type("SimpleProfilerMixin", (), {}),
        "auto_register_config": lambda cls: cls,
    },
    "fusion_bench.modelpool": {"BaseModelPool": object},
    "fusion_bench.models": {},
    "fusion_bench.taskpool": {"CLIPVisionModelTaskPool": object},
    "fusion_bench.utils": {"LazyStateDict": type("LazyStateDict", (), {}), "seed_everything_by_time": lambda f: None},
    "fusion_bench.utils.json": {"save_to_json": lambda *a, **k: None, "load_from_json": lambda *a, **k: None},
    "lightning": {"seed_everything": lambda seed: None},
    "omegaconf": {"DictConfig": dict},
    "transformers": {"CLIPVisionModel": nn.Module},
}


def load_release(git_dir: str, folder: Path) -> None:
    for path in REAL:
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        source = subprocess.run(
            ["git", "-C", git_dir, "show", f"{COMMIT}:{path}"], capture_output=True, check=True, text=True
        ).stdout
        target.write_text(source)
    for name, attributes in STUBS.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        if name.startswith("fusion_bench"):
            module.__path__ = [str(folder / name.replace(".", "/"))]  # a package: real submodules load
        sys.modules[name] = module
    sys.path.insert(0, str(folder))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 4)


class Pool:
    def __init__(self, base: nn.Module, models: list[nn.Module]) -> None:
        self.base, self.models = base, {f"task{t}": m for t, m in enumerate(models)}
        self.model_names = list(self.models)

    def load_pretrained_model(self):
        return deepcopy(self.base)

    def load_model(self, name):
        return deepcopy(self.models[name])


def make_models(dtype: torch.dtype) -> tuple[nn.Module, list[nn.Module]]:
    torch.manual_seed(0)
    base = Net().to(dtype)
    g = torch.Generator().manual_seed(1)
    models = []
    for t in range(4):
        model = deepcopy(base)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01 * (t + 1) * torch.randn(p.shape, generator=g).to(dtype))
        models.append(model)
    return base, models


def run(algorithm, base, models) -> dict[str, torch.Tensor]:
    algorithm._program = types.SimpleNamespace(taskpool=types.SimpleNamespace(_test_datasets={}))
    merged = algorithm.run(Pool(base, models))
    return {k: v.detach().clone().contiguous() for k, v in merged.state_dict().items()}


def main(git_dir: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        load_release(git_dir, Path(tmp))
        from fusion_bench.method.dop.dop import ContinualDOPForCLIP
        from fusion_bench.method.opcm.task_arithmetic import ContinualTaskArithmeticForCLIP
        from fusion_bench.method.opcm.ties_merging import ContinualTiesMergingForCLIP
        from fusion_bench.method.opcm.weight_average import ContinualWeightAverageForCLIP

        flags = {"shuffle_order": False, "save_on_every_step": False, "evaluate_on_every_step": False}
        # config/method/dop/dop.yaml, the authors' defaults
        dop_defaults = {
            "lr": 1e-4,
            "num_steps": 200,
            "mgda": True,
            "alpha": 0.8,
            "ema": True,
            "ema_beta": 0.999,
            "svd_epsilon": 0.99999,
            "svd_proj_space": "uv",
        }
        dop_variants = {
            "default": {},
            "nomgda": {"mgda": False},
            "noema": {"ema": False},
            "u": {"svd_proj_space": "u"},
            "v_eps0.9": {"svd_proj_space": "v", "svd_epsilon": 0.9},
            "lr1e-3_steps50": {"lr": 1e-3, "num_steps": 50},
        }
        out = {}
        for dtype, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
            base, models = make_models(dtype)
            out.update({f"{tag}.base.{k}": v for k, v in base.state_dict().items()})
            for t, model in enumerate(models):
                out.update({f"{tag}.task{t}.{k}": v for k, v in model.state_dict().items()})
            for n in (2, 3, 4):
                # config/method/opcm/ties_merging.yaml: scaling_factor 0.5, threshold 20, merge_func sum
                for func, threshold, scale in (("sum", 20, 0.5), ("mean", 20, 0.5), ("max", 20, 0.5), ("sum", 50, 0.3)):
                    algorithm = ContinualTiesMergingForCLIP(
                        scaling_factor=scale, threshold=threshold, merge_func=func, **flags
                    )
                    merged = run(algorithm, base, models[:n])
                    out.update({f"{tag}.ties_{func}_k{threshold}_s{scale}_T{n}.{k}": v for k, v in merged.items()})
                for name, changes in dop_variants.items():
                    if name != "default" and n != 3:
                        continue
                    algorithm = ContinualDOPForCLIP(**{**dop_defaults, **changes}, **flags)
                    merged = run(algorithm, base, models[:n])
                    out.update({f"{tag}.dop_{name}_T{n}.{k}": v for k, v in merged.items()})
            merged = run(ContinualTaskArithmeticForCLIP(scaling_factor=0.3, **flags), base, models)
            out.update({f"{tag}.cta_s0.3_T4.{k}": v for k, v in merged.items()})
            merged = run(ContinualWeightAverageForCLIP(**flags), base, models)
            out.update({f"{tag}.cwa_T4.{k}": v for k, v in merged.items()})
        save_file(out, OUT, metadata={"repository": "tanganke/fusion_bench", "commit": COMMIT})
        print(f"{OUT.name}: {len(out)} tensors")


if __name__ == "__main__":
    main(sys.argv[1])
