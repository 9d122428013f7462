"""Given fine-tuned checkpoints instead of training (``finetuned``): the protocol of data-free
continual merging (OPCM, DOP), where every task's model was fine-tuned elsewhere from theta_0.

Step t reads task t's checkpoint (``method_options.finetuned.checkpoints``: task name -> a local
directory, a ``.safetensors`` file or a hub id) into the model, so the run's task vector is
tau_t = theta_t - theta_0 over the entries the model tunes. Each task starts from theta_0 and
reads nothing of the others (``independent``): with ``data.orders: K`` it is read once per seed.
Merge methods compose as with Ind-FT: ``finetuned+opcm``, ``finetuned+ties``.

A checkpoint's keys name the model's entries directly (a mergecl state) or as the encoder alone
does: a Hugging Face ``CLIPVisionModel`` such as FusionBench's names ``vision_model.x`` (transformers
4, and the hub files) or ``x`` (transformers 5 loads it so) what the ``hf_clip`` learner calls
``encoder.vision_model.x``; a full ``CLIPModel``'s text side is skipped.
Tuned entries the checkpoint lacks (a CLIPVisionModel has no ``visual_projection``) stay at
theta_0. A key that names nothing of the model, or a shape that differs, is a one-line error
naming the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated

import torch
from pydantic import AfterValidator
from torch import Tensor

from mergecl.errors import MergeclError
from mergecl.methods.trainings import Step, StepResult, register_training
from mergecl.models._util import one_line
from mergecl.models.base import tuned_keys
from mergecl.models.lora import lora_pairs
from mergecl.models.text import check_local_or_hub, import_transformers
from mergecl.options import Options

# the text side of a full CLIPModel checkpoint: never part of an image learner
TEXT_SIDE = ("text_model.", "text_projection.", "logit_scale")
# how a checkpoint key may name a learner entry: as it is, the encoder's, or a CLIP vision tower's own
PREFIXES = ("", "encoder.", "encoder.vision_model.")


def _reference(value: str) -> str:
    if "/" not in value and "\\" not in value:
        raise ValueError(f"{value!r} is no path or hub id (owner/name; a local folder: ./{value})")
    return value


Reference = Annotated[str, AfterValidator(_reference)]


class FinetunedOptions(Options):
    checkpoints: dict[str, Reference] = {}  # task name -> directory, .safetensors or hub id


def learner_entries(state: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], name: str) -> dict[str, Tensor]:
    """A checkpoint's tensors under the learner's keys (``shapes``: the learner's entries and their
    shapes): the first of ``PREFIXES`` + key the learner has (``vision_model.x`` and ``x`` ->
    ``encoder.vision_model.x``); the text side of a CLIP checkpoint and the ``position_ids`` buffer
    older checkpoints carry are skipped.
    ``name`` (the checkpoint) goes into the one-line error for a key or shape that does not match."""
    mapped: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith(TEXT_SIDE):
            continue
        target = next((p + key for p in PREFIXES if p + key in shapes), None)
        if target is None:
            if key.endswith("position_ids"):  # a non-persistent buffer older transformers saved
                continue
            raise MergeclError(f"checkpoint {name}: '{key}' is no entry of the model (another architecture?)")
        if tuple(value.shape) != tuple(shapes[target]):
            theirs, ours = tuple(value.shape), tuple(shapes[target])
            raise MergeclError(f"checkpoint {name}: '{key}' has shape {theirs}, the model's {target} {ours}")
        mapped[target] = value
    if not mapped:
        raise MergeclError(f"checkpoint {name}: none of its tensors is an entry of the model")
    return mapped


def read_checkpoint(ref: str) -> dict[str, Tensor]:
    """A checkpoint's state: a ``.safetensors`` file, or a directory / hub id that transformers'
    ``AutoModel.from_pretrained`` loads (a ``CLIPVisionModel`` for FusionBench's)."""
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise MergeclError(f"checkpoint {ref}: a file must be .safetensors (or give a directory or hub id)")
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # a truncated or foreign file
            raise MergeclError(f"checkpoint {ref}: cannot read it: {one_line(exc)}") from None
    check_local_or_hub(ref)
    transformers = import_transformers()
    try:
        model = transformers.AutoModel.from_pretrained(ref)
    except (OSError, ValueError) as exc:
        raise MergeclError(f"checkpoint {ref}: cannot load it: {one_line(exc)}") from None
    return {k: v.detach() for k, v in model.state_dict().items()}


def finetuned_step(step: Step) -> StepResult:
    task = step.task.name
    ref = step.options.checkpoints.get(task)
    if ref is None:
        given = ", ".join(step.options.checkpoints) or "none"
        raise MergeclError(f"method_options.finetuned.checkpoints: no checkpoint for task '{task}' (given: {given})")
    learner = step.learner
    if lora_pairs(learner):
        raise MergeclError(f"method_options.finetuned: checkpoint {ref} is a dense model; the run's model has LoRA")
    own, tuned = learner.state_dict(), set(tuned_keys(learner))  # tuned: the task vector's entries
    entries = learner_entries(read_checkpoint(ref), {k: tuple(v.shape) for k, v in own.items()}, ref)
    with torch.no_grad():
        for key, value in entries.items():
            if key in tuned:  # the other entries are not in the task vector: theta_0's stay
                own[key].copy_(value.to(own[key].dtype))
    return StepResult()


register_training(
    "finetuned",
    finetuned_step,
    continues=False,
    independent=True,
    options=FinetunedOptions,
    summary="given fine-tuned checkpoints, one per task (method_options.finetuned.checkpoints): no training",
)
