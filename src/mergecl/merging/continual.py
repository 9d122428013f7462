"""The continual-merging protocol: an ordered stream of fine-tuned checkpoints merged one at a time,
the merged model written (or returned) after every step.

Step s (1..T) is the merge of checkpoints 1..s by the rule, exactly what ``merge`` gives for the
first s checkpoints. Two ways to get there, one result:

- **running** (the rule declares a running form that goes on without a whole-model pass,
  ``Rule.running_form``: average, task_arithmetic, magmax, random_mix, dop, opcm): a running state
  of one model's size (fp32, fp64 for fp64 tensors) goes on from step to step; for a rule with a
  model-wide coefficient (opcm's rescaling) also each task vector's squared norm, summed in the
  order of the rule's own pass. Each step reads the base twice, the new
  checkpoint once and the state twice, and writes the new state and the output: O(1) in T, and
  memory O(chunk) as in every merge. The state lives in a hidden temporary directory inside the
  output directory (in memory without one) and is removed at the end. random_mix's running form is
  a reservoir (each entry keeps task t's value with probability 1/t): the same distribution as
  ``merge``'s draw, other draws.
- **recompute** (every other rule, or ``recompute=True``): step s is the engine's merge of
  checkpoints 1..s from scratch, correct for every rule (sequential rules such as opcm and
  continual_ties fold in task order), at O(s) reads per step, O(T^2) over the stream.

The running form computes on the CPU; a merge on a device (``device: cuda``) recomputes every step.

A step's output is a normal merge output (``OUT/stepS``: a directory in the Hugging Face layout,
with the base's companion files and a model card); all outputs are checked before the first is
written, and each is written atomically, so a failure at step s leaves steps 1..s-1 complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, closing
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergecl.errors import MergeclError
from mergecl.merging.checkpoints import check_output, numel, open_checkpoint, write_checkpoint
from mergecl.merging.device import resolve_device
from mergecl.merging.engine import (
    MergeResult,
    Source,
    _collect,
    _companions,
    _compute_dtype,
    _input_sources,
    _Merge,
    _name,
    _overflows,
    _pipeline,
    _public,
    merge_checkpoints,
    read_merge_options,
)
from mergecl.merging.registry import RNG_BLOCK, Rule, all_rules, get_rule
from mergecl.progress import bar as progress_bar
from mergecl.tensors import all_finite, squared_norm

STATE_PREFIX = ".mergecl-running-"  # the running state's temporary directory inside OUT


def step_path(out: str | os.PathLike, step: int) -> Path:
    """Where step ``step`` (1-based) of a continual merge into ``out`` is written."""
    return Path(out) / f"step{step}"


def uses_running(method: str, recompute: bool = False) -> bool:
    """Whether a continual merge by ``method`` goes on from a running state (O(1) reads per step)."""
    return not recompute and get_rule(method).running_form(norms_kept=True) is not None


def running_rules() -> list[str]:
    """The rules a continual merge runs from a running state (``uses_running``), plugins' included."""
    return [name for name in all_rules() if uses_running(name)]


def continual_merges(
    base: Source,
    finetuned: Sequence[Source],
    method: str = "average",
    *,
    out: str | os.PathLike | None = None,
    task_vectors: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    force: bool = False,
    recompute: bool = False,
    **options: Any,
) -> Iterator[MergeResult]:
    """Yield the merge of checkpoints 1..s for s = 1..T, as each step is done (see the module
    docstring); ``out``: a directory, step s written to ``OUT/stepS`` (``step_path``). The other
    arguments are ``merge``'s; ``recompute``: merge from scratch at every step even where the rule
    has a running form."""
    rule = get_rule(method)
    if isinstance(finetuned, str | os.PathLike | Mapping):
        finetuned = [finetuned]
    finetuned = list(finetuned)
    if not finetuned:
        raise MergeclError("give at least one fine-tuned checkpoint to merge")
    if rule.max_models is not None and len(finetuned) > rule.max_models:
        raise MergeclError(f"method '{method}' merges at most {rule.max_models} fine-tuned model(s)")
    given_inputs = {name: options.pop(name, None) for name in rule.inputs}
    inputs = {
        name: _input_sources(method, name, spec.per_task, given_inputs[name], len(finetuned))
        for name, spec in rule.inputs.items()
    }
    opts = read_merge_options(method, options)
    if uses_running(method, recompute) and resolve_device(opts.device).type != "cpu":
        raise MergeclError(
            f"device {opts.device}: the running form of a continual merge computes on the CPU; "
            f"merge every step on {opts.device} with --recompute (recompute=True)"
        )
    if out is not None:
        out = Path(out)
        if os.path.lexists(out) and (out.is_symlink() or not out.is_dir()):
            raise MergeclError(f"{out}: exists and is not a directory (a continual merge writes OUT/step1, ...)")
        sources = [base, *finetuned, *(src for srcs in inputs.values() for src in srcs)]
        files = [src for src in sources if not isinstance(src, Mapping)]
        for step in range(1, len(finetuned) + 1):
            check_output(step_path(out, step), files, force)
        out.mkdir(parents=True, exist_ok=True)
    if not uses_running(method, recompute):
        yield from _recompute(base, finetuned, method, out, inputs, task_vectors, max_shard_size, progress, options)
        return
    yield from _running(rule, method, opts, base, finetuned, out, task_vectors, max_shard_size, progress)


def merge_continual(base: Source, finetuned: Sequence[Source], method: str = "average", **options: Any) -> list:
    """The continual-merging protocol (``continual_merges``) as a list: step s's merged state dict,
    or with ``out`` the path it was written to (``OUT/stepS``). The arguments are ``merge``'s, plus
    ``recompute`` (merge from scratch at every step even where the rule has a running form).

    >>> merge_continual("base.safetensors", ["ft1.safetensors", "ft2.safetensors"], out="steps")  # doctest: +SKIP
    [PosixPath('steps/step1'), PosixPath('steps/step2')]
    """
    return [r.state if r.state is not None else r.path for r in continual_merges(base, finetuned, method, **options)]


def _recompute(base, finetuned, method, out, inputs, task_vectors, max_shard_size, progress, options):
    """Step s = the engine's merge of checkpoints 1..s (a rule input given per task: its first s)."""
    rule = get_rule(method)
    for step in range(1, len(finetuned) + 1):
        step_inputs = {
            name: sources[:step] if rule.inputs[name].per_task else sources for name, sources in inputs.items()
        }
        yield merge_checkpoints(
            base,
            finetuned[:step],
            method,
            out=None if out is None else step_path(out, step),
            task_vectors=task_vectors,
            max_shard_size=max_shard_size,
            progress=progress,
            force=True,  # checked with the caller's force before the first step
            **dict(options),
            **step_inputs,
        )


def _running(rule: Rule, method, opts, base, finetuned, out, task_vectors, max_shard_size, progress):
    """The running form, step by step: pass A folds tau_s into the state (old state file -> new
    one), pass B writes theta_0 + lam * finish(state, s)."""
    running = rule.running
    assert running is not None
    count = len(finetuned)
    with ExitStack() as stack:
        base_reader = stack.enter_context(open_checkpoint(base, "base"))
        ft_readers = [stack.enter_context(open_checkpoint(src, f"finetuned[{i}]")) for i, src in enumerate(finetuned)]
        folder = None
        if out is not None:
            folder = Path(tempfile.mkdtemp(prefix=STATE_PREFIX, dir=out))
            stack.callback(shutil.rmtree, folder, ignore_errors=True)
        selected = [base_reader.spec(key) for key in base_reader.keys() if opts.selects(key)]
        nbytes = sum(numel(shape) * dtype.itemsize for dtype, shape in selected if dtype.is_floating_point)
        bar = stack.enter_context(
            progress_bar(3 * nbytes * count, f"continual {method}", enabled=progress, unit="B", unit_scale=True)
        )
        # one merge over all T checkpoints: every layout is checked before step 1; step s reads tau_s
        job = _Merge(rule, opts, base_reader, ft_readers, {}, bar, task_vectors)
        merged = [e for e in job.entries if e.merged]
        state: Any = None  # the running state after the last step: a path or an in-memory state dict
        task_sq: list[float] = []  # a rule with a coefficient: each task vector's squared norm
        for t in range(count):
            norms: dict[tuple[str, int], tuple[float, float]] | None = {} if running.coefficient else None
            with ExitStack() as step_stack:
                previous = None if state is None else step_stack.enter_context(open_checkpoint(state, "running state"))
                fold = _folder(job, running, previous, t, opts.seed, norms)
                chunks = _pipeline(_jobs(job, merged), fold, job.workers)
                step_stack.callback(chunks.close)  # the pool ends here, even on an error
                wide = [replace(e, dtype=_compute_dtype(e.dtype)) for e in merged]  # the state's dtypes
                specs = [(e.key, e.dtype, e.shape) for e in wide]
                if folder is None:
                    new_state: Any = _collect(wide, chunks)
                else:
                    new_state = write_checkpoint(folder / f"state{t + 1}.safetensors", specs, chunks, {"format": "pt"})
            if isinstance(state, Path):
                state.unlink()
            state = new_state
            lam, info = opts.lam, {}
            if norms is not None:  # summed in tensor order, as the rule's prepare pass sums them
                chunks_in_order = [norms[(entry.key, start)] for entry, start, _ in _jobs(job, merged)]
                task_sq.append(sum(tau_sq for tau_sq, _ in chunks_in_order))
                merged_norm = sum(merged_sq for _, merged_sq in chunks_in_order) ** 0.5
                scale = running.coefficient([n**0.5 for n in task_sq], merged_norm)
                lam, info = opts.lam * scale, {"lambda": scale}
            with open_checkpoint(state, "running state") as current:
                yield _write_step(
                    job, running, current, t + 1, method, opts, base, finetuned, out, max_shard_size, lam, info
                )


def _jobs(job: _Merge, entries) -> Iterator[tuple]:
    for entry in entries:
        for start, stop in job._bounds(entry):
            yield entry, start, stop


def _folder(job: _Merge, running, previous, t: int, seed: int, norms: dict | None = None):
    """compute(entry, start, stop): the state after task t (0-based) on [start, stop), a fresh tensor.
    Draws come from a generator seeded by (seed, tensor, t) per RNG block (per tensor for a
    ``tensor`` rule), so the result does not depend on chunking or threads. ``norms`` (a rule with a
    coefficient) gets, per chunk, tau_t's squared norm and the finished state's (float64)."""
    own = job.rule_options

    def folded(entry, start: int, stop: int, base: Tensor, tau: Tensor) -> Tensor:
        if previous is None:
            return tau.clone()
        state = previous.read(entry.key, start, stop).to(base.dtype, copy=True)
        generator = torch.Generator()
        kwargs = {**own, "name": entry.key} if running.named else own
        if job.rule.granularity == "tensor":
            generator.manual_seed(zlib.crc32(f"{seed}:running:{entry.key}:{t}".encode()))
            return running.update(state.reshape(entry.shape), tau.reshape(entry.shape), t, generator, **kwargs).reshape(
                -1
            )
        for lo in range(0, stop - start, RNG_BLOCK):  # chunks start on block boundaries
            hi = min(lo + RNG_BLOCK, stop - start)
            generator.manual_seed(zlib.crc32(f"{seed}:running:{entry.key}:{t}:{(start + lo) // RNG_BLOCK}".encode()))
            block = running.update(state[lo:hi], tau[lo:hi], t, generator, **kwargs)
            if block.data_ptr() != state[lo:hi].data_ptr():
                state[lo:hi].copy_(block)
        return state

    def compute(entry, start: int, stop: int) -> Tensor:
        base = job._read_base(entry, start, stop)
        tau = job._tau(t, entry, start, stop, base, job.buffers.get(("tau",), stop - start, base.dtype))
        tau_sq = squared_norm(tau) if norms is not None else 0.0
        state = folded(entry, start, stop, base, tau)
        if norms is not None:
            shaped = state.reshape(entry.shape) if job.rule.granularity == "tensor" else state
            norms[(entry.key, start)] = (tau_sq, squared_norm(running.finish(shaped.clone(), t + 1)))
        return state

    return compute


def _write_step(job: _Merge, running, state, step, method, opts, base, finetuned, out, max_shard_size, lam, info):
    """Step ``step``'s model theta_0 + lam * finish(state, step), in memory or written to OUT/stepS
    (``info``: reported with it, e.g. the coefficient)."""

    def jobs() -> Iterator[tuple]:
        for entry in job.entries:
            bounds = job._bounds(entry) if entry.merged else job._copy_bounds(entry)
            for start, stop in bounds:
                yield entry, start, stop

    def compute(entry, start: int, stop: int) -> Tensor:
        if not entry.merged:
            return job.base.read(entry.key, start, stop)
        base = job._read_base(entry, start, stop)
        value = state.read(entry.key, start, stop).to(base.dtype, copy=True)
        if job.rule.granularity == "tensor":
            value = value.reshape(entry.shape)
        merged = running.finish(value, step).reshape(-1)
        merged = base.add(merged, alpha=lam) if lam != 1.0 else base.add(merged)
        if not all_finite(merged) or _overflows(merged, entry.dtype):
            raise MergeclError(f"tensor {entry.key!r}: the merged values overflow {entry.dtype}")
        return merged.to(entry.dtype)

    with closing(_pipeline(jobs(), compute, job.workers)) as chunks:  # the pool ends here, even on an error
        return _written_step(job, chunks, step, method, opts, base, finetuned, out, max_shard_size, info)


def _written_step(job: _Merge, chunks, step, method, opts, base, finetuned, out, max_shard_size, info) -> MergeResult:
    rule = job.rule
    info = {"step": step, "running": True, **info}
    if out is None:
        return MergeResult(state=_collect(job.entries, chunks), path=None, info=info)
    inputs = finetuned[:step]
    metadata = {
        "format": "pt",
        "mergecl_method": method,
        "mergecl_options": json.dumps(_public(rule, opts), sort_keys=True),
        "mergecl_inputs": json.dumps([_name(src) for src in [base, *inputs]]),
        "mergecl_info": json.dumps(info),
    }
    specs = [(e.key, e.dtype, e.shape) for e in job.entries]
    extra = _companions(base, method, opts, rule, inputs, {})
    path = write_checkpoint(step_path(out, step), specs, chunks, metadata, max_shard_size, extra)
    return MergeResult(state=None, path=path, info=info)
