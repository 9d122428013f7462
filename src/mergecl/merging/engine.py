"""The merge engine: applies a declared merge rule (registry.py) to whole checkpoints, out of core.

For every tensor of the base checkpoint, in order, and for every chunk of it, the engine reads the
base chunk, streams the task vectors' chunks (tau_t = theta_t - theta_0, in fp32 or fp64) into the
rule in the form its declaration asks for, and emits theta_0 + lam * merged in the tensor's dtype:

- ``fold`` rules get one task vector at a time in one reused buffer: memory O(chunk) whatever the
  number of checkpoints;
- ``stack`` rules get the T chunks of one position as a [T, n] buffer (the chunk shrinks as T grows);
- ``tensor`` rules get whole tensors in their shape, one fresh tensor per task vector.

A rule's ``prepare`` runs its whole-model passes first (TIES's model-wide threshold, BECAME's sums)
through the same chunk streams. Random draws (a rule's, and DARE's) are made per block of 65,536
elements from (seed, stream, tensor name, block), so results do not depend on chunking or threads:
in-memory and streaming merges agree bit for bit. Validation (keys, shapes, dtypes, NaN/Inf,
overflow) raises ``MergeclError`` naming the tensor and the file; an output is written only when the
whole merge succeeded.

``device``: where the rule computes. On the CPU (the default) ``workers`` threads may compute chunks
ahead, or, for the merge pass of a large merge on Linux, as many forked processes (forked.py). On
a CUDA device (``_StagedMerge``) the merge pass moves every chunk the rule computes on
(base, task vectors, inputs, draws, all read or drawn on the CPU as here) to the device through
pinned buffers and brings the merged chunk back (device.py), so that reading, transfers, computing
and writing overlap; the checks run on the device and are read with the chunk, and a chunk that
fails one is computed again on the CPU for the CPU's error. The results are the CPU's up to float
rounding (the same fp32/fp64 arithmetic, other summation orders). A rule's ``prepare`` passes run
on the CPU.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, create_model, field_validator
from torch import Tensor

from mergecl.errors import MergeclError
from mergecl.merging import fused, rules
from mergecl.merging.checkpoints import check_output, numel, open_checkpoint, write_checkpoint
from mergecl.merging.device import DEVICE_PATTERN, Landing, Staging, resolve_device
from mergecl.merging.forked import can_fork, forked_map
from mergecl.merging.registry import RNG_BLOCK, Chunk, Draw, Rule, TensorInfo, get_rule
from mergecl.options import Options, read_options
from mergecl.progress import bar as progress_bar
from mergecl.tensors import all_finite

DEFAULT_CHUNK = 1 << 18  # elements per chunk and input (1 MB fp32): stays in cache, fastest here
# ... in forked workers, which pay no lock hand-off per op: half, and the chunk's buffers fit a core's
# L2 (bf16 average of 8 models 1.26-1.33 s against 1.34-1.46 s; MagMax 2.2 s against 2.5-2.8 s)
FORKED_CHUNK = 1 << 17
# ... and fewer for a fold rule with more buffers of its own (``fold_buffers``): a chunk's fp32
# buffers (the base, the task vector and the rule's) fit this much of a core's 2 MB L2 (MagMax's
# three at 64K entries: bf16 1.53-1.55 s against 1.71-1.76 s at 128K; the average's one: no change)
FORKED_CACHE = 3 << 19
STACK_BUDGET = 1 << 25  # elements a ``stack`` rule may hold per chunk position, over all T inputs
WHOLE_BUDGET = 256 << 20  # bytes whole tensors (``whole_tensors``) may hold over all threads (and one model's at most)
# checkpoint bytes a merge pass reads from which its workers are forked processes (Linux; a merge
# written to a file): they were faster at 3.95 GB (bf16, 8 models) and 7.9 GB, no faster at 1 GB
FORK_FROM = 2 << 30
LAM_LIMIT = torch.finfo(torch.float32).max
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# what a ``picks`` rule gathers from as stored (else from the task vectors)
PICKED_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
# True: CPU merges go through the device stage too, its transfers plain copies (the tests' way to run
# the code of a CUDA merge on a machine without one)
STAGE_CPU = False

Source = str | os.PathLike | Mapping[str, Tensor]


class EngineOptions(Options):
    """The options of every merge, whatever the rule (a rule adds its own: ``merge_schema``)."""

    lam: float | None = Field(None, description="scaling coefficient of the merged task vector (default: the rule's)")
    seed: int = Field(0, description="seed of the random draws (random_mix, dare)")
    dare: float = Field(0.0, ge=0, lt=1, description="DARE: drop each task-vector entry with this probability")
    include: str | None = Field(None, description="merge only tensors whose name matches this regex")
    exclude: str | None = Field(None, description="copy tensors whose name matches this regex from the base")
    chunk_size: int = Field(
        DEFAULT_CHUNK,
        description=f"elements per chunk, a multiple of {RNG_BLOCK} (if not given: {FORKED_CHUNK} in forked workers)",
    )
    workers: int | None = Field(
        None,
        ge=1,
        description="workers computing chunks, one core each: forked processes for a large merge pass on Linux, "
        "else threads (default: torch's thread count; 1 on a GPU; whole-tensor rules always use torch's own "
        "threads; the same result)",
    )
    device: str = Field(
        "cpu",
        description="where the rule computes: cpu, cuda or cuda:N (the chunks streamed through pinned buffers; "
        "the same result up to float rounding)",
    )

    @field_validator("lam")
    @classmethod
    def _finite_lam(cls, lam):
        # lam scales fp32 tensors: a larger one overflows every non-zero entry
        if isinstance(lam, float) and not abs(lam) <= LAM_LIMIT:
            raise ValueError(f"lam must be a finite number of at most {LAM_LIMIT:.4g} in size")
        return lam

    @field_validator("include", "exclude")
    @classmethod
    def _regex(cls, pattern):
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"not a valid regular expression ({err})") from None
        return pattern

    @field_validator("device")
    @classmethod
    def _device_name(cls, name):
        if not DEVICE_PATTERN.fullmatch(name):
            raise ValueError("expected cpu, cuda or cuda:N")
        return name

    @field_validator("chunk_size")
    @classmethod
    def _whole_blocks(cls, size):
        if size < RNG_BLOCK or size % RNG_BLOCK:
            raise ValueError(f"chunk_size must be a positive multiple of {RNG_BLOCK}")
        return size

    def selects(self, key: str) -> bool:
        if self.include is not None and not re.search(self.include, key):
            return False
        return not (self.exclude is not None and re.search(self.exclude, key))


@functools.cache
def merge_schema(method: str) -> type[Options]:
    """The options of a merge by ``method``: the engine's plus the rule's own, one typed schema."""
    rule = get_rule(method)
    return create_model(f"{method}_merge_options", __base__=(rule.options, EngineOptions))


@dataclass
class MergeResult:
    state: dict[str, Tensor] | None  # in-memory result (no ``out`` given)
    path: Path | None  # written checkpoint (``out`` given)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"lambda": lam*} for became


@dataclass(frozen=True)
class _Entry(TensorInfo):
    merged: bool  # False: copied from the base (non-float, or not selected)


def _overflow_limit(dtype: torch.dtype) -> float | None:
    """The smallest magnitude that does not round to a finite ``dtype`` value (IEEE round to
    nearest: max + half an ulp at max); None for fp32/fp64, whose overflow is already inf.
    Checked before converting: torch saturates fp8 e4m3fn (1e6 becomes 448) without a word."""
    if dtype in (torch.float32, torch.float64):
        return None
    info = torch.finfo(dtype)
    return info.max + 2.0 ** math.floor(math.log2(info.max)) * info.eps / 2


def _overflows(merged: Tensor, dtype: torch.dtype) -> bool:
    limit = _overflow_limit(dtype)
    if limit is None:
        return False
    low, high = torch.aminmax(merged)
    return max(-float(low), float(high)) >= limit


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _layout(base, others: list[tuple[Any, str]], options: EngineOptions) -> list[_Entry]:
    """The base's tensors (merged or copied), checked against every other checkpoint: each holds
    the merged tensors with the base's shapes; fine-tuned weights hold all of the base's floating-point
    tensors (a missing integer buffer comes from the base, said once on stderr), and no tensor the
    base lacks."""
    entries = []
    for key in base.keys():
        dtype, shape = base.spec(key)
        entries.append(_Entry(key, dtype, tuple(shape), dtype.is_floating_point and options.selects(key)))
    known = {e.key for e in entries}
    from_base: list[str] = []
    for reader, role in others:
        keys = set(reader.keys())
        for entry in entries:
            if role != "fine-tuned" and not entry.merged and entry.key not in keys:
                continue  # task vectors and other inputs only need the merged tensors
            if entry.key not in keys and not entry.dtype.is_floating_point:
                # an integer buffer (e.g. BERT's position_ids, which newer transformers no longer
                # save): never merged, so the base's copy is the answer
                from_base.append(entry.key)
                continue
            if entry.key not in keys:
                raise MergeclError(f"{reader.name}: missing tensor '{entry.key}' (present in the base {base.name})")
            dtype, shape = reader.spec(entry.key)
            if tuple(shape) != entry.shape:
                raise MergeclError(
                    f"{reader.name}: tensor '{entry.key}' has shape {list(shape)}, the base has {list(entry.shape)}"
                )
            if entry.merged and not dtype.is_floating_point:
                raise MergeclError(f"{reader.name}: tensor '{entry.key}' is {dtype}, the base's is {entry.dtype}")
        if role in ("fine-tuned", "task vector"):
            extra = sorted(keys - known)
            if extra:
                raise MergeclError(f"{reader.name}: tensor '{extra[0]}' is not in the base {base.name}")
    if from_base:
        names = sorted(set(from_base))
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        print(
            f"mergecl: non-float tensor(s) {listed} missing from a fine-tuned checkpoint: taken from the base",
            file=sys.stderr,
        )
    return entries


class _Buffers:
    """Reusable flat buffers: fresh allocations of chunk-sized tensors cost page faults. One set
    per thread (``workers`` > 1 computes chunks in a pool), on ``device`` (None: the CPU). A full
    chunk gets the buffer itself: slicing it under the interpreter lock, at every read of every
    chunk, held the other merge threads back (a bf16 average of 8 models 8 % slower)."""

    def __init__(self, size: int, device: torch.device | None = None) -> None:
        self.size = size
        self.device = device
        self._local = threading.local()  # slot -> buffer, this thread's

    def get(self, slot: tuple, n: int, dtype: torch.dtype) -> Tensor:
        buffers = self._local.__dict__
        buffer = buffers.get(slot)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < n:
            buffer = buffers[slot] = torch.empty(max(n, self.size), dtype=dtype, device=self.device)
        return buffer if buffer.numel() == n else buffer[:n]


def _non_finite(name: str, key: str) -> MergeclError:
    return MergeclError(f"{name}: tensor '{key}' has NaN/Inf values")


def forked_chunk(rule: Rule) -> int:
    """A forked worker's chunk for ``rule``: ``FORKED_CHUNK``, or less for a fold whose buffers (its
    ``fold_buffers``, the base's and the task vector's) would not fit ``FORKED_CACHE`` (a multiple of
    ``RNG_BLOCK``, as every chunk)."""
    if rule.granularity != "fold":
        return FORKED_CHUNK
    fits = FORKED_CACHE // (torch.float32.itemsize * (2 + rule.fold_buffers))
    return max(RNG_BLOCK, min(FORKED_CHUNK, fits // RNG_BLOCK * RNG_BLOCK))


class _Tally:
    """A forked worker's progress bar: counts the bytes read, which the parent's bar then shows."""

    def __init__(self) -> None:
        self.count = 0

    def update(self, n: float = 1) -> None:
        self.count += int(n)

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def pass_workers(rule: Rule, options: EngineOptions) -> int:
    """The threads of a merge pass: as asked, else one per core torch would use for chunked rules
    on the CPU, and one for whole-tensor rules (their SVDs and matrix products use torch's own
    threads) and on a GPU (one stream of chunks)."""
    if rule.granularity == "tensor":  # a pool would run their SVDs single-threaded: other roundings
        return 1
    if options.workers is not None:
        return options.workers
    if options.device != "cpu" or STAGE_CPU:
        return 1
    return torch.get_num_threads()


def _pipeline(jobs: Iterator[tuple], compute: Callable[..., Tensor], workers: int) -> Iterator[Tensor]:
    """``compute(*job)`` for every job, in order. With ``workers`` > 1 a thread pool computes up to
    2 x workers chunks ahead (torch and the preadv reads release the GIL), each on one core: torch's
    own threads would fork and join on every op of a 1 MB chunk, and under contention wait on a
    descheduled thread. ``jobs`` itself is advanced in this thread (whole-tensor preparation runs
    here)."""
    if workers == 1:
        for job in jobs:
            yield compute(*job)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with ThreadPoolExecutor(workers, thread_name_prefix="mergecl-merge") as pool:
        pending: deque[Future] = deque()
        try:
            for job in jobs:
                pending.append(pool.submit(compute, *job))
                while len(pending) > 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error or an abandoned generator: no chunk is left computing
            for future in pending:
                future.cancel()
            torch.set_num_threads(threads)


class _Merge:
    """One merge: the readers, the validated layout, and the chunk streams a rule consumes (it is
    the ``MergeView`` a rule's ``prepare`` gets)."""

    def __init__(
        self, rule: Rule, options, base, finetuned, inputs, progress, vectors: bool, to_file: bool = False
    ) -> None:
        self.rule = rule
        self.options = options
        self.rule_options = {name: getattr(options, name) for name in rule.options.model_fields}
        self.base = base
        self.finetuned = finetuned
        self.inputs = inputs  # input name -> readers
        self.progress = progress
        self.vectors = vectors  # finetuned readers hold task vectors tau_t, not weights theta_t
        others = [(r, "task vector" if vectors else "fine-tuned") for r in finetuned]
        others += [(r, name) for name, readers in inputs.items() for r in readers]
        self.entries = _layout(base, others, options)
        if not any(e.merged for e in self.entries):
            raise MergeclError("no floating-point tensor is selected for merging (check --include/--exclude)")
        self.num_tasks = len(finetuned)
        self.chunk_size = options.chunk_size
        if rule.granularity == "stack":  # all T chunks of a position at once: shrink the chunk as T grows
            budget = max(RNG_BLOCK, (STACK_BUDGET // (self.num_tasks + 2)) // RNG_BLOCK * RNG_BLOCK)
            self.chunk_size = min(self.chunk_size, budget)
        self.whole_tensors = rule.granularity == "stack" and rule.whole_tensors(options)
        # the rule's fused step, where it can run here (compiled now, before any worker is forked)
        self.fused = rule.fused if rule.fused and not vectors and fused.library() is not None else None
        self.stored_dtypes: dict[str, torch.dtype | None] = {}  # tensor -> ``_stored_dtype``
        model_bytes = sum(e.numel * e.dtype.itemsize for e in self.entries)
        self.whole_budget = min(WHOLE_BUDGET, model_bytes)  # memory: the interpreter plus one model at most
        self.buffers = _Buffers(self.chunk_size)
        # fixed now: inside the merge pass torch runs single-threaded, and a pass nested in it (a
        # tensor's own TIES thresholds, through ``map``) must still get the pool's threads
        self.workers = pass_workers(rule, options)
        pass_bytes = model_bytes * (self.num_tasks + 1 + sum(len(readers) for readers in inputs.values()))
        # forked workers only for a merge streamed to a file (``to_file``): while they live, every page
        # this process writes is first copied (copy-on-write), and a result collected here in memory
        # made a 1 GB merge 2.5-7x slower than threads
        self.forks = to_file and self.workers > 1 and can_fork() and pass_bytes >= FORK_FROM

    # --- the MergeView of a rule's ``prepare`` -----------------------------------------------------

    def tensors(self) -> list[TensorInfo]:
        return [e for e in self.entries if e.merged]

    def one_chunk(self, tensor: TensorInfo) -> bool:
        """Whether ``tensor`` comes in one chunk: whole-tensor rules, small tensors, and for a rule
        declared ``whole_tensors`` those whose T + 2 rows, in every thread at once, fit the budget
        (WHOLE_BUDGET, and no more than the model's own bytes): memory stays bounded whatever the
        number of tasks and cores."""
        if self.rule.granularity == "tensor" or tensor.numel <= self.chunk_size:
            return True
        rows = (self.num_tasks + 2) * tensor.numel * self.workers
        return self.whole_tensors and rows * _compute_dtype(tensor.dtype).itemsize <= self.whole_budget

    def chunks(self, tensors: list[TensorInfo]) -> Iterator[Chunk]:
        for entry in tensors:
            for start, stop in self._bounds(entry):
                yield self._read_chunk(entry, start, stop)

    def map(self, fn: Callable[[Chunk], Any], tensors: list[TensorInfo]) -> Iterator[Any]:
        jobs = ((entry, start, stop) for entry in tensors for start, stop in self._bounds(entry))
        return _pipeline(jobs, lambda *job: fn(self._read_chunk(*job)), self.workers)

    def _read_chunk(self, entry: TensorInfo, start: int, stop: int) -> Chunk:
        base = self._read_base(entry, start, stop)
        return Chunk(entry, start, stop, self._taus(entry, start, stop, base), self._inputs(entry, start, stop))

    # --- reading --------------------------------------------------------------------------------

    def _bounds(self, entry: TensorInfo) -> Iterator[tuple[int, int]]:
        step = entry.numel if self.one_chunk(entry) else self.chunk_size
        for start in range(0, entry.numel, max(step, 1)):
            yield start, min(start + step, entry.numel)

    def _raw(self, reader, key: str, start: int, stop: int, slot: str | None, into: Tensor | None = None) -> Tensor:
        """Elements [start, stop) of ``key`` as ``reader`` stores them, where the rule computes (here
        the CPU; ``_StagedMerge``: its device), in the reused buffer ``slot`` (None: a fresh tensor),
        or straight into ``into`` where that has the stored dtype (a fp32 checkpoint read into the
        compute's own buffer: a copy and a buffer less per chunk, so that a fold's buffers stay in
        the core's 2 MB cache; the fp32 average 1.67-1.96 s against 2.21-2.41 s in process)."""
        dtype = reader.spec(key)[0]
        if into is not None and into.dtype == dtype:
            out = into
        else:
            out = None if slot is None else self.buffers.get(("raw", slot), stop - start, dtype)
        return reader.read(key, start, stop, out=out)

    def _read_base(self, entry: TensorInfo, start: int, stop: int) -> Tensor:
        n = stop - start
        base = self.buffers.get(("base",), n, _compute_dtype(entry.dtype))
        raw = self._raw(self.base, entry.key, start, stop, "base", into=base)
        self.progress.update(n * entry.dtype.itemsize)
        return base if raw.data_ptr() == base.data_ptr() else base.copy_(raw)

    def _taus(self, entry: TensorInfo, start: int, stop: int, base: Tensor, checked: bool = True):
        """The task vectors of a chunk in the form the rule declared (see the module docstring), each
        checked finite unless ``checked`` is False (the caller checks the merged chunk)."""
        n = stop - start
        if self.rule.granularity == "fold":
            out = self.buffers.get(("tau",), n, base.dtype)
            return (self._tau(t, entry, start, stop, base, out, checked) for t in range(self.num_tasks))
        if self.rule.granularity == "stack":
            stack = self.buffers.get(("stack",), self.num_tasks * n, base.dtype).view(self.num_tasks, n)
            for t in range(self.num_tasks):
                tau = self._tau(t, entry, start, stop, base, stack[t], checked)
                if tau.data_ptr() != stack[t].data_ptr():  # DARE made a new tensor
                    stack[t].copy_(tau)
            return stack
        return (
            self._tau(t, entry, start, stop, base, torch.empty_like(base), checked).reshape(entry.shape)
            for t in range(self.num_tasks)
        )

    def _tau(
        self, t: int, entry: TensorInfo, start: int, stop: int, base: Tensor, out: Tensor, checked: bool = True
    ) -> Tensor:
        """tau_t on [start, stop) in ``out``: read, checked finite (if ``checked``), DARE applied."""
        reader = self.finetuned[t]
        theta = self._raw(reader, entry.key, start, stop, "theta", into=out)
        self.progress.update(theta.numel() * theta.dtype.itemsize)
        self._minus_base(theta, base, out)
        if checked and not self._finite(out):
            self._blame_non_finite(entry.key, reader, start, stop, base)
        if self.options.dare:
            p = self.options.dare
            drop = Draw(f"dare{t}", lambda n, g, num_tasks: torch.rand(n, generator=g) < p)
            drop = self._draw(drop, entry, start, stop)
            return rules.dare(out, drop, p)
        return out

    def _minus_base(self, theta: Tensor, base: Tensor, out: Tensor) -> Tensor:
        """theta - base in ``out`` (theta as read: the task vector itself if ``vectors``)."""
        if theta.data_ptr() == out.data_ptr():  # read straight into out
            return out if self.vectors else out.sub_(base)
        if self.vectors:
            return out.copy_(theta)
        if theta.dtype != out.dtype:  # widen first: faster than a mixed-dtype sub, and fp8 needs it
            return out.copy_(theta).sub_(base)
        return torch.sub(theta, base, out=out)

    def _stored_dtype(self, key: str) -> torch.dtype | None:
        """The dtype every fine-tuned checkpoint stores ``key`` in, or None where they differ (read
        once per tensor: the stored and fused paths ask at every chunk)."""
        if key not in self.stored_dtypes:
            dtypes = {reader.spec(key)[0] for reader in self.finetuned}
            self.stored_dtypes[key] = dtypes.pop() if len(dtypes) == 1 else None
        return self.stored_dtypes[key]

    def _fusable(self, entry: TensorInfo, base: Tensor) -> bool:
        """Whether the fused steps read this tensor: checkpoints in a dtype they take, fp32 compute."""
        return base.dtype == torch.float32 and self._stored_dtype(entry.key) in fused.DTYPES

    def _stored(self, entry: TensorInfo, start: int, stop: int) -> Tensor | None:
        """The [T, n] stack of the fine-tuned checkpoints' values on [start, stop), as stored, each
        checked finite; None where they are not all stored in one dtype a gather takes."""
        dtype = self._stored_dtype(entry.key)
        if dtype not in PICKED_DTYPES:
            return None
        n = stop - start
        stack = self.buffers.get(("stored",), self.num_tasks * n, dtype).view(self.num_tasks, n)
        for t, reader in enumerate(self.finetuned):
            theta = self._raw(reader, entry.key, start, stop, "theta", into=stack[t])
            self.progress.update(n * theta.dtype.itemsize)
            if theta.data_ptr() != stack[t].data_ptr():  # through a device's staging buffer
                stack[t].copy_(theta)
            if not self._finite(stack[t]):
                raise _non_finite(reader.name, entry.key)
        return stack

    def _fused(self, entry: TensorInfo, start: int, stop: int, base: Tensor, checked: bool, picked: bool):
        """The merged task vector by the rule's fused step (fused.py), or None: a fold's where its
        merged chunk alone is checked, a pick's outside a ``blame`` pass and without DARE."""
        if self.fused == "pick":
            return self._fused_pick(entry, start, stop, base) if picked and not self.options.dare else None
        if self.fused and not checked:
            return self._fused_fold(entry, start, stop, base)
        return None

    def _fused_fold(self, entry: TensorInfo, start: int, stop: int, base: Tensor) -> Tensor | None:
        """The rule's fold as its fused step (fused.py) over the checkpoints' chunks as stored: one
        pass each, the same bits as ``running.update`` over the task vectors; None where a
        checkpoint's dtype is not one the step reads (or the compute's is not fp32)."""
        if not self._fusable(entry, base):
            return None
        state = self.buffers.get(("tau",), stop - start, torch.float32)
        for t, reader in enumerate(self.finetuned):
            theta = self._raw(reader, entry.key, start, stop, "theta")
            self.progress.update(theta.numel() * theta.dtype.itemsize)
            fused.step(self.fused if t else "first", state, theta, base)
        assert self.rule.running is not None  # a rule declared fused has its running form
        return self.rule.running.finish(state, self.num_tasks)

    def _fused_pick(self, entry: TensorInfo, start: int, stop: int, base: Tensor) -> Tensor | None:
        """A ``picks`` rule's pick by its fused step: the rule's draws of task indices (the same
        values as its ``Draw``) and one pass per checkpoint chunk as stored, each checked finite;
        None where a dtype is not one the step reads or there are too many tasks for a byte."""
        if not self._fusable(entry, base) or self.num_tasks > fused.MAX_PICKED_TASKS:
            return None
        n = stop - start
        (draw,) = self.rule.draws.values()
        picks = self.buffers.get(("picks",), n, torch.uint8)
        scratch = self.buffers.get(("block picks",), RNG_BLOCK, torch.uint8)
        for block_seed, lo, count in draw.blocks(self.options.seed, entry.key, start, stop, entry.numel):
            fused.draw_tasks(scratch[:count], block_seed, self.num_tasks)
            first, last = max(start, lo), min(stop, lo + count)
            picks[first - start : last - start].copy_(scratch[first - lo : last - lo])
        state = self.buffers.get(("tau",), n, torch.float32)
        for t, reader in enumerate(self.finetuned):
            theta = self._raw(reader, entry.key, start, stop, "theta")
            self.progress.update(n * theta.dtype.itemsize)
            if fused.pick(state, theta, base, picks, t):
                raise _non_finite(reader.name, entry.key)
        return state

    def _inputs(self, entry: TensorInfo, start: int, stop: int) -> dict[str, Iterator[Tensor]]:
        dtype = _compute_dtype(entry.dtype)
        return {name: self._input(name, readers, entry, start, stop, dtype) for name, readers in self.inputs.items()}

    def _input(self, name, readers, entry, start, stop, dtype) -> Iterator[Tensor]:
        for reader in readers:
            values = self._raw(reader, entry.key, start, stop, None).to(dtype)
            if not self._holds(torch.isfinite(values).all()):
                raise _non_finite(reader.name, entry.key)
            if self.rule.inputs[name].non_negative and not self._holds((values >= 0).all()):
                raise MergeclError(f"{reader.name}: tensor '{entry.key}' has negative values (a {name} is >= 0)")
            yield values

    def _draw(self, draw: Draw, entry: TensorInfo, start: int, stop: int) -> Tensor:
        return draw.make(self.options.seed, entry.key, start, stop, entry.numel, self.num_tasks)

    # --- the checks (``_StagedMerge`` keeps them on its device and reads them with the chunk) ------

    def _holds(self, check: Tensor) -> bool:
        return bool(check)

    def _finite(self, x: Tensor) -> bool:
        return all_finite(x)

    def _fits(self, merged: Tensor, out: Tensor) -> bool:
        """The merged values are finite and stay so in the output dtype (``out``, merged rounded to
        it): fp16 and bf16 overflow to inf, so ``out`` is checked (half the bytes); fp8 saturates
        without a word, so ``merged`` is checked against its limit."""
        if out.dtype in (torch.float16, torch.bfloat16):
            return all_finite(out)
        return all_finite(merged) and not _overflows(merged, out.dtype)

    def _blame_non_finite(self, key: str, reader, start: int, stop: int, base: Tensor) -> None:
        if not torch.isfinite(base).all():
            raise _non_finite(self.base.name, key)
        if not torch.isfinite(reader.read(key, start, stop)).all():  # read again: out may hold it no more
            raise _non_finite(reader.name, key)
        raise MergeclError(f"{reader.name}: tensor '{key}' overflows when subtracted from the base")

    # --- the merge pass -------------------------------------------------------------------------

    def output(self, lam: float, kwargs_of: Callable[[TensorInfo], dict] | None) -> Iterator[Tensor]:
        """theta_0 + lam * rule(...) for every chunk of every tensor, in the output dtype, in order.
        Computed by forked processes for a large pass (``forks``) whose chunks need nothing from this
        process (no per-tensor arguments from a rule's ``prepare``, which are computed as the pass
        goes); else in threads."""
        if self.forks and kwargs_of is None:
            return self._forked_output(lam)
        return _pipeline(self._jobs(kwargs_of), functools.partial(self._chunk, lam), self.workers)

    def _forked_output(self, lam: float) -> Iterator[Tensor]:
        """``output`` from ``workers`` forked processes (forked.py); the bytes they read go to this
        process's progress bar, and a chunk that fails in one is computed here for its error."""
        entries = self.entries
        if "chunk_size" not in self.options.model_fields_set:  # the last pass: the prepare passes are done
            self.chunk_size = min(self.chunk_size, forked_chunk(self.rule))
            self.buffers = _Buffers(self.chunk_size)  # sized for it: a full chunk gets a buffer, not a slice

        def compute(index: int, start: int, stop: int) -> Tensor:
            return self._chunk(lam, entries[index], start, stop, {})

        def child_init() -> Callable[[], int]:
            self.progress = tally = _Tally()
            return tally.take

        jobs = ((i, start, stop) for i, entry in enumerate(entries) for start, stop in self._all_bounds(entry))
        # a tensor's first chunk is its largest
        firsts = ((entry, next(self._all_bounds(entry), (0, 0))) for entry in entries)
        slot_bytes = max((stop - start) * entry.dtype.itemsize for entry, (start, stop) in firsts)
        chunks = forked_map(
            jobs,
            compute,
            lambda job: (entries[job[0]].dtype, job[2] - job[1]),
            self.workers,
            slot_bytes,
            child_init=child_init,
            on_failure=lambda job: compute(*job),
        )
        with closing(chunks):  # the workers end with this generator, even when it is abandoned
            for chunk, nread in chunks:
                self.progress.update(nread)
                yield chunk

    def _jobs(self, kwargs_of: Callable[[TensorInfo], dict] | None) -> Iterator[tuple[_Entry, int, int, dict]]:
        """Every chunk, in order, with the rule's extra arguments for its tensor (from ``kwargs_of``:
        whole-tensor passes run here, in this thread, not in the pool)."""
        for entry in self.entries:
            extra = kwargs_of(entry) if entry.merged and kwargs_of is not None else {}
            for start, stop in self._all_bounds(entry):
                yield entry, start, stop, extra

    def _all_bounds(self, entry: _Entry) -> Iterator[tuple[int, int]]:
        return self._bounds(entry) if entry.merged else self._copy_bounds(entry)

    def _chunk(self, lam: float, entry: _Entry, start: int, stop: int, extra: dict) -> Tensor:
        if not entry.merged:
            return self._copied(entry, start, stop)
        return self._merged(entry, start, stop, lam, extra)

    def _copied(self, entry: _Entry, start: int, stop: int) -> Tensor:
        base = self.base.read(entry.key, start, stop)
        self.progress.update(base.numel() * entry.dtype.itemsize)
        return base

    def _merged(self, entry: _Entry, start: int, stop: int, lam: float, extra: dict, blame: bool = False) -> Tensor:
        """theta_0 + lam * rule(...) on [start, stop), checked, in the tensor's dtype. The task
        vectors are checked one by one if the rule needs it (``propagates_non_finite`` False, or
        DARE, which drops entries) or ``blame`` asks; otherwise a merged chunk that fails its check
        is merged again with ``blame``, every task vector checked, to name the input at fault."""
        checked = blame or not self.rule.propagates_non_finite or bool(self.options.dare)
        base = self._read_base(entry, start, stop)
        merged = self._merge_chunk(entry, start, stop, base, extra, checked, picked=not blame).reshape(-1)
        merged = base.add_(merged, alpha=lam) if lam != 1.0 else base.add_(merged)  # in base's buffer
        out = merged.to(entry.dtype, copy=True)  # a fresh tensor: the buffer is the next chunk's
        if not self._fits(merged, out):
            if not blame:
                self._merged(entry, start, stop, lam, extra, blame=True)  # raises the input's error
            raise MergeclError(f"tensor {entry.key!r}: the merged values overflow {entry.dtype}")
        return out

    def _copy_bounds(self, entry: TensorInfo) -> Iterator[tuple[int, int]]:
        for start in range(0, entry.numel, self.chunk_size):
            yield start, min(start + self.chunk_size, entry.numel)

    def _merge_chunk(
        self,
        entry: TensorInfo,
        start: int,
        stop: int,
        base: Tensor,
        extra: dict,
        checked: bool = True,
        picked: bool = False,
    ) -> Tensor:
        """The rule's merged task vector on [start, stop): by its fused step where it has one that
        applies (``_fused``), else by its function. A rule that ``picks`` (with ``picked``, no DARE)
        picks from the stored values, and the base is subtracted from its picks only; a task vector
        that overflows there is found by the ``blame`` pass, which takes the task vectors as every
        rule does."""
        merged = self._fused(entry, start, stop, base, checked, picked)
        if merged is not None:
            return merged
        kwargs = {**self.rule_options, **extra, **self._inputs(entry, start, stop)}
        for name, draw in self.rule.draws.items():
            kwargs[name] = self._draw(draw, entry, start, stop)
        stored = self._stored(entry, start, stop) if picked and self.rule.picks and not self.options.dare else None
        if stored is None:
            return self.rule.fn(self._taus(entry, start, stop, base, checked), **kwargs)
        tau = self.buffers.get(("tau",), stop - start, base.dtype)
        return self._minus_base(self.rule.fn(stored, **kwargs), base, tau)


class _StagedMerge(_Merge):
    """The merge pass of ``job`` on ``staging``'s device: every chunk the rule computes on goes there
    through pinned buffers and the merged chunk comes back (device.py). The checks stay on the device
    and are read with the chunk, one chunk later, while the device computes the next; a chunk that
    fails one, or whose rule raises there, is computed again by ``job`` on the CPU, which raises the
    CPU's error (naming the tensor and the file)."""

    def __init__(self, job: _Merge, staging: Staging) -> None:
        vars(self).update(vars(job))  # the same readers, layout, options and progress bar
        self.host = job
        self.fused = None  # the fused steps run on the CPU
        self.staging = staging
        self.buffers = _Buffers(job.chunk_size, staging.device)
        self.checks: list[Tensor] = []  # the current chunk's, each a bool on the device

    def _raw(self, reader, key: str, start: int, stop: int, slot: str | None, into: Tensor | None = None) -> Tensor:
        """As ``_Merge._raw``, through a pinned host buffer to the device (``into``, a device buffer,
        is not read into)."""

        def read_into(host: Tensor) -> Tensor:
            return reader.read(key, start, stop, out=host)

        return self.staging.load(slot or reader.name, stop - start, reader.spec(key)[0], read_into)

    def _draw(self, draw: Draw, entry: TensorInfo, start: int, stop: int) -> Tensor:
        return self.staging.upload("draw", super()._draw(draw, entry, start, stop))  # drawn on the CPU

    def _holds(self, check: Tensor) -> bool:
        self.checks.append(check)
        return True  # for now: read with the chunk (``_land``)

    def _finite(self, x: Tensor) -> bool:
        return self._holds(torch.isfinite(x).all())

    def _fits(self, merged: Tensor, out: Tensor) -> bool:
        limit = _overflow_limit(out.dtype)
        return self._holds(merged.abs().amax() < (math.inf if limit is None else limit))  # NaN: False

    def output(self, lam: float, kwargs_of: Callable[[TensorInfo], dict] | None) -> Iterator[Tensor]:
        """As ``_Merge.output``; chunk k goes to the writer once chunk k + 1 is on its way (the writer
        is done with a chunk when it asks for the next: two output buffers suffice)."""
        pending: deque[tuple[tuple, Tensor | Landing]] = deque()
        for job in self._jobs(kwargs_of):
            pending.append((job, self._launch(lam, *job)))
            if len(pending) == 2:
                yield self._land(lam, *pending.popleft())
        while pending:
            yield self._land(lam, *pending.popleft())

    def _launch(self, lam: float, entry: _Entry, start: int, stop: int, extra: dict) -> Tensor | Landing:
        if not entry.merged:
            return self._copied(entry, start, stop)
        self.checks = []
        try:
            merged = self._merged(entry, start, stop, lam, extra)
        except MergeclError:
            raise
        except Exception:  # e.g. an SVD that fails on a NaN the checks have not reported yet
            self.host._merged(entry, start, stop, lam, extra, blame=True)  # the CPU's error if the inputs are bad
            raise
        return self.staging.download(merged, torch.stack(self.checks).all())

    def _land(self, lam: float, job: tuple, launched: Tensor | Landing) -> Tensor:
        if isinstance(launched, Tensor):
            return launched
        if not launched.wait():
            entry, start, stop, extra = job
            self.host._merged(entry, start, stop, lam, extra, blame=True)  # raises the CPU's error
            device = self.staging.device
            raise MergeclError(f"tensor {entry.key!r}: the merged values overflow {entry.dtype} (on {device})")
        return launched.host


def read_merge_options(method: str, options: Mapping[str, Any]):
    """``options`` (keyword arguments, CLI flags) checked against the merge's schema; None means
    'not given'. The rule's default lam fills in; a rule that computes its own refuses one."""
    rule = get_rule(method)
    given = {k: v for k, v in options.items() if v is not None}
    typed = read_options(merge_schema(method), given, method)
    if typed.lam is None:
        return typed.model_copy(update={"lam": rule.lam})
    if rule.lam is None:
        raise MergeclError(f"method '{method}' computes its own coefficient: do not pass lam")
    return typed


def merge_checkpoints(
    base: Source,
    finetuned: Sequence[Source],
    method: str = "average",
    *,
    out: str | os.PathLike | None = None,
    task_vectors: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    force: bool = False,
    **options: Any,
) -> MergeResult:
    """Merge ``finetuned`` checkpoints into ``base`` by ``method``; see ``merge`` for the arguments."""
    rule = get_rule(method)
    if isinstance(finetuned, str | os.PathLike | Mapping):
        finetuned = [finetuned]
    if len(finetuned) == 0:
        raise MergeclError("give at least one fine-tuned checkpoint to merge")
    given_inputs = {name: options.pop(name, None) for name in rule.inputs}
    opts = read_merge_options(method, options)
    staging = _staging(opts)
    if rule.max_models is not None and len(finetuned) > rule.max_models:
        raise MergeclError(f"method '{method}' merges at most {rule.max_models} fine-tuned model(s)")
    inputs = {
        name: _input_sources(method, name, spec.per_task, given_inputs[name], len(finetuned))
        for name, spec in rule.inputs.items()
    }

    if out is not None:
        sources = [base, *finetuned, *(src for srcs in inputs.values() for src in srcs)]
        check_output(out, [src for src in sources if not isinstance(src, Mapping)], force)
    with ExitStack() as readers:

        def opened(source, name):
            return readers.enter_context(open_checkpoint(source, name))

        base_reader = opened(base, "base")
        ft_readers = [opened(src, f"finetuned[{i}]") for i, src in enumerate(finetuned)]
        input_readers = {
            name: [
                opened(src, name if len(srcs) == 1 and not rule.inputs[name].per_task else f"{name}[{i}]")
                for i, src in enumerate(srcs)
            ]
            for name, srcs in inputs.items()
        }
        nbytes = sum(numel(base_reader.spec(k)[1]) * base_reader.spec(k)[0].itemsize for k in base_reader.keys())
        total = nbytes * (len(ft_readers) + 1) * (1 + rule.passes(opts))
        bar = readers.enter_context(progress_bar(total, "merging", enabled=progress, unit="B", unit_scale=True))
        job = _Merge(rule, opts, base_reader, ft_readers, input_readers, bar, task_vectors, to_file=out is not None)
        prepared = rule.prepare(job, opts) if rule.prepare is not None else None
        lam = prepared.lam if prepared is not None and prepared.lam is not None else opts.lam
        info = dict(prepared.info) if prepared is not None else {}
        merging = job if staging is None else _StagedMerge(job, staging)
        chunks = merging.output(lam, prepared.kwargs if prepared is not None else None)
        # closed here, not when collected: an error's traceback (kept by a caller) would keep the
        # pool, and torch's single-threaded setting, alive
        readers.callback(chunks.close)
        if out is None:
            return MergeResult(state=_collect(job.entries, chunks), path=None, info=info)
        metadata = {
            "format": "pt",
            "mergecl_method": method,
            "mergecl_options": json.dumps(_public(rule, opts), sort_keys=True),
            "mergecl_inputs": json.dumps([_name(src) for src in [base, *finetuned]]),
            "mergecl_info": json.dumps({k: v for k, v in info.items() if k != "thresholds"}),
        }
        specs = [(e.key, e.dtype, e.shape) for e in job.entries]
        extra = {} if Path(out).suffix == ".safetensors" else _companions(base, method, opts, rule, finetuned, info)
        path = write_checkpoint(out, specs, chunks, metadata, max_shard_size, extra)
        return MergeResult(state=None, path=path, info=info)


def _staging(opts) -> Staging | None:
    """The device stage of a merge with these options; None: the merge computes on the CPU."""
    device = resolve_device(opts.device)
    if device.type == "cpu" and not STAGE_CPU:
        return None
    if opts.workers is not None and opts.workers > 1:
        raise MergeclError(f"workers goes with device cpu (a merge on {device} overlaps its reads and computing)")
    return Staging(device)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".gguf")


def companion_files(directory: str | os.PathLike) -> dict[str, Path]:
    """The files of a model directory other than its weights and model card (config, tokenizer,
    sentence-transformers modules), by relative name: what makes a directory of new weights load
    like this one (``merge`` into a directory, ``mergecl export``). Hidden files are left out."""
    root = Path(directory)
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        hidden = any(part.startswith(".") for part in relative.parts)
        weights = path.name.endswith(WEIGHT_SUFFIXES) or path.name.endswith(".index.json")
        if path.is_file() and not hidden and not weights and relative.as_posix() != "README.md":
            files[relative.as_posix()] = path
    return files


def _companions(base: Source, method: str, opts, rule: Rule, finetuned, info) -> dict[str, Path | bytes]:
    """What makes a directory output loadable like its base: the base directory's files other than
    weights (config, tokenizer, sentence-transformers modules), and a model card (README.md)."""
    files: dict[str, Path | bytes] = {}
    if not isinstance(base, Mapping) and Path(base).is_dir():
        files.update(companion_files(base))
    card = [
        "---",
        "tags: [mergecl, merge]",
        "---",
        f"# Merged with mergecl: {method}",
        "",
        f"- base: `{_name(base)}`",
        f"- merged: {', '.join(f'`{_name(src)}`' for src in finetuned)} (in this order)",
        f"- rule: {method} ({rule.summary})",
        f"- options: `{json.dumps(_public(rule, opts), sort_keys=True)}`",
    ]
    if info.get("lambda") is not None:
        card.append(f"- computed lambda*: {info['lambda']:.6g}")
    card += ["", "Load it as its base model loads, e.g. `transformers.AutoModel.from_pretrained(this_directory)`.", ""]
    files["README.md"] = "\n".join(card).encode("utf-8")
    return files


def _input_sources(method: str, name: str, per_task: bool, given, count: int) -> list[Source]:
    """The checkpoints given for a rule's input ``name``: one per fine-tuned model, or one."""
    if isinstance(given, str | os.PathLike | Mapping):
        given = [given]
    given = list(given or [])
    wanted = count if per_task else 1
    if len(given) != wanted:
        what = f"one {name} per fine-tuned checkpoint" if per_task else f"one {name}"
        raise MergeclError(f"method '{method}' needs {what} ({len(given)} given)")
    return given


def _public(rule: Rule, opts) -> dict[str, Any]:
    """The options that shape the result (for the output's metadata)."""
    keys = ["lam", "seed", "dare", "include", "exclude", *rule.options.model_fields]
    data = {k: getattr(opts, k) for k in keys}
    return {k: v for k, v in data.items() if v is not None}


def _collect(entries: list[_Entry], chunks: Iterator[Tensor]) -> dict[str, Tensor]:
    state = {}
    for entry in entries:
        flat = torch.empty(entry.numel, dtype=entry.dtype)
        filled = 0
        while filled < entry.numel:
            chunk = next(chunks)
            flat[filled : filled + chunk.numel()] = chunk
            filled += chunk.numel()
        state[entry.key] = flat.reshape(entry.shape)
    return state


def _name(source: Source) -> str:
    return "<state dict>" if isinstance(source, Mapping) else Path(source).name


def merge(
    base: Source,
    finetuned: Sequence[Source],
    method: str = "average",
    **options: Any,
) -> dict[str, Tensor] | Path:
    """Merge fine-tuned checkpoints into a base checkpoint.

    base, finetuned: state dicts or paths (.safetensors, sharded HF directories, .pt/.bin loaded
    with weights_only=True). method: a registered rule (``mergecl.merging.all_rules()``; ``mergecl
    merge --help`` lists them with their options). Options: every merge's (``EngineOptions``: lam,
    seed, dare, include, exclude (regexes on tensor names), chunk_size, workers, device: "cpu",
    "cuda" or "cuda:N"), the rule's own
    (e.g. keep and scope for ties), the rule's inputs (e.g. fisher, prior_precision), and:
    task_vectors (the ``finetuned`` inputs already are task vectors tau_t: they need only the
    merged tensors), out (path: write a safetensors file, or a sharded directory when ``out`` has no
    .safetensors suffix), force (replace an existing ``out``, only if it is an earlier mergecl
    output), max_shard_size, progress.

    Returns the merged state dict, or the output path when ``out`` is given.

    >>> merged = merge(base_state, [state_1, state_2], "ties", keep=0.2)  # doctest: +SKIP
    """
    result = merge_checkpoints(base, finetuned, method, **options)
    return result.state if result.state is not None else result.path
