"""Reading encoder weights from files without ever unpickling code.

``.safetensors`` files are read by mergecl's one safetensors reader (``merging.checkpoints``: the
header checked strictly); anything else with ``torch.load(weights_only=True)`` on the CPU, which
refuses pickles that carry code. A ``{"state_dict": ...}`` wrapper (akamaster's
checkpoints, many training scripts) is unwrapped and a DataParallel ``module.`` prefix is stripped.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from mergecl.errors import MergeclError
from mergecl.merging.checkpoints import load_torch_state_dict, read_safetensors


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, keys without a ``module.`` prefix."""
    path = Path(path)
    if not path.is_file():
        raise MergeclError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        raw = read_safetensors(path)
    else:
        try:
            raw = load_torch_state_dict(path)  # the one torch.load(weights_only=True) of the project
        except MergeclError as err:
            if "does not hold a flat dict of tensors" in str(err):
                raise MergeclError(f"{path}: not a state dict (expected a mapping of names to tensors)") from None
            raise
    return {_strip_prefix(str(k)): v for k, v in raw.items()}


def load_weights(module: nn.Module, path: str | Path, drop_prefixes: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Strictly load a checkpoint into ``module``, first dropping keys under ``drop_prefixes``.

    Returns the dropped tensors (e.g. a classifier that the encoder does not use).
    """
    state = read_state_dict(path)
    if state and all(k.startswith(("encoder.", "head.")) for k in state):
        # A whole Learner checkpoint: its encoder part is what an encoder loads.
        state = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    prefixes = tuple(drop_prefixes)
    dropped = {k: v for k, v in state.items() if prefixes and k.startswith(prefixes)}
    kept = {k: v for k, v in state.items() if k not in dropped}
    expected = module.state_dict()
    # Checkpoints older than torch 0.4.1 (akamaster's) lack BatchNorm's step counter; torch fills it in.
    missing = sorted(k for k in set(expected) - set(kept) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(kept) - set(expected))
    if missing or unexpected:
        raise MergeclError(
            f"{path}: weights do not match the model (missing {_first(missing)}, unexpected {_first(unexpected)})"
        )
    for key, tensor in kept.items():
        if tensor.shape != expected[key].shape:
            raise MergeclError(
                f"{path}: tensor {key!r} has shape {tuple(tensor.shape)}, "
                f"the model expects {tuple(expected[key].shape)}"
            )
    module.load_state_dict(kept, strict=True)
    return dropped


def _strip_prefix(key: str) -> str:
    return key[len("module.") :] if key.startswith("module.") else key


def _first(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more
