"""Merge rules declare themselves here; the engine, the CLI, the Python API and the CL methods read
the declaration, never a rule's name.

A rule is a function over the task vectors tau_t = theta_t - theta_0 of one tensor (or one chunk of
it) that returns the merged task vector; the engine adds ``lam`` times it to theta_0. Its
declaration says what it needs, so the engine pays only for that:

- ``granularity``: how the task vectors are handed over.
  ``fold``   element-wise, one task vector at a time (an iterator of flat chunks sharing one
             buffer: do not keep them): memory O(1) in the number of task vectors.
  ``stack``  element-wise, all at once: a [T, n] tensor of one chunk position (the rule may edit it).
  ``tensor`` whole tensors in their own shape, in task order (an iterator of fresh tensors: a rule
             may fold over them carrying a state from one task to the next, or keep them all, e.g.
             an SVD of each weight matrix).
- ``lam``: the default coefficient; None when the rule computes its own (``prepare`` returns it).
- ``options``: a typed schema (``mergecl.options.Options``) of the rule's own options; they reach
  ``fn`` as keyword arguments. The CLI flags and the config's ``method_options`` derive from it.
- ``draws``: random inputs, keyword -> ``Draw``; the engine makes them from (seed, stream, tensor
  name, position), so a result does not depend on chunking or threads.
- ``inputs``: other checkpoints the rule reads, name -> ``Input`` (``fisher``: one per task vector,
  non-negative; ``prior_precision``: one), given to ``merge`` under that name and to ``fn`` (and
  ``prepare``) as lazy iterators over the checkpoints' chunks.
- ``prepare``: whole-model passes before the merge (TIES's model-wide threshold, BECAME's sums).
  It gets a ``MergeView`` and the options and returns ``Prepared``: keyword arguments for ``fn``
  per tensor, a computed lam, and info to report.
- ``running``: how the rule goes on from its own state when one more task vector arrives
  (``Running``), so that a model kept up to date task after task (``mergecl learn``) stores one
  tensor per tensor, whatever the number of tasks. A rule without it keeps every task vector there.
- ``whole_tensors``: (``stack`` rules, per options) hand each tensor over in one chunk wherever its
  T task vectors, in every merge thread at once, fit the engine's budget for whole tensors (and the
  model's own size), in chunks only beyond it (TIES per tensor: a tensor in one chunk finds its own
  threshold there, with no streaming passes over the checkpoints); ``MergeView.one_chunk`` says which.
- ``propagates_non_finite``: a NaN or infinite entry of any task vector makes that entry of the
  merged vector non-finite (sums and selects by magnitude do; a random pick does not). The engine
  then checks the merged chunk only, not every task vector's (a pass over each input saved), and
  looks for the culprit only when the merged chunk fails (tests/merging/test_merging_declared.py
  checks every rule that claims it).
- ``fused``: (``fold`` rules with a running form that propagates non-finite entries) the name of
  the step in merging/fused.c that does the running update and the subtraction of the base in one
  pass over a checkpoint's chunk ("sum", "magmax"); or "pick" for a rule that ``picks`` by one
  draw of ``torch.randint(num_tasks)`` (random mix): the draws and the pick in C. The engine uses
  it where the C compiler allows, with the same bits as torch's ops
  (tests/merging/test_merging_fused.py).
- ``picks``: (``stack`` rules) each entry of the result is one task vector's entry there, chosen
  without looking at the values (a random pick). The engine then hands the rule the checkpoints'
  stored values instead of the task vectors and subtracts the base from the picked entries only:
  the same bits, one subtraction per entry instead of one per entry and task. Every checkpoint is
  still checked finite (the same test file checks the claim).

A rule without ``inputs`` is also a continual-learning method: ``RULE`` merges the Seq-FT task
vectors of a run after every step, ``ind_ft+RULE`` the Ind-FT ones.
"""

from __future__ import annotations

import typing
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

from mergecl.errors import MergeclError
from mergecl.merging.fused import STEPS as FUSED_STEPS
from mergecl.options import Options
from mergecl.plugins import load_plugins

RNG_BLOCK = 1 << 16  # random draws are made per block of this many elements: chunking-independent
Granularity = Literal["fold", "stack", "tensor"]
GRANULARITIES: tuple[str, ...] = typing.get_args(Granularity)


@dataclass(frozen=True)
class Draw:
    """Random values for a rule: ``values(n, generator, num_tasks)`` draws n of them; ``stream``
    names the draw in the seeding (two draws of one rule need two streams)."""

    stream: str
    values: Callable[[int, torch.Generator, int], Tensor]

    def make(self, seed: int, key: str, start: int, stop: int, total: int, num_tasks: int) -> Tensor:
        """The values of elements [start, stop) of tensor ``key`` (``total`` elements), the same
        whatever the chunking: element i's value comes from block i // RNG_BLOCK, whose generator is
        seeded from (seed, stream, key, block)."""
        parts = []
        generator = torch.Generator()
        for block_seed, lo, count in self.blocks(seed, key, start, stop, total):
            generator.manual_seed(block_seed)
            values = self.values(count, generator, num_tasks)
            parts.append(values[max(start - lo, 0) : min(stop - lo, RNG_BLOCK)])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def blocks(self, seed: int, key: str, start: int, stop: int, total: int) -> Iterator[tuple[int, int, int]]:
        """(its generator's seed, its first element, its length) of each block [start, stop) touches."""
        for block in range(start // RNG_BLOCK, (stop - 1) // RNG_BLOCK + 1):
            lo = block * RNG_BLOCK
            yield zlib.crc32(f"{seed}:{self.stream}:{key}:{block}".encode()), lo, min(RNG_BLOCK, total - lo)


@dataclass(frozen=True)
class Input:
    """Another checkpoint a rule reads besides the task vectors (read chunk by chunk, like them)."""

    per_task: bool = True  # one per task vector; False: exactly one
    non_negative: bool = False  # e.g. a Fisher or a precision: a negative value is an error


@dataclass(frozen=True)
class Running:
    """A rule as a running state of one tensor's shape: the state after task 1 is tau_1;
    ``update(state, tau_t, t, generator, **options)`` (t: the 0-based index of tau_t, >= 1; the
    rule's own options) gives the next one and may edit ``state`` in place; ``finish(state, count)``
    is the merged task vector. A rule that draws takes its draws from ``generator``, seeded per
    tensor and task. A rule with a ``prepare`` that computes its coefficient says how it goes on:
    ``coefficient(task_norms, merged_norm)``, from every task vector's whole-model norm (kept by
    the holder: one number per task) and the finished vector's; without it, such a rule's running
    form is not used. ``named``: ``update`` also gets ``name=``, the tensor's (e.g. OPCM, which
    projects weight matrices but not embedding tables)."""

    update: Callable[..., Tensor]
    finish: Callable[[Tensor, int], Tensor] = lambda state, count: state
    coefficient: Callable[[list[float], float], float] | None = None
    named: bool = False


@dataclass(frozen=True)
class TensorInfo:
    """A tensor the merge covers."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


@dataclass
class Chunk:
    """Elements [start, stop) of a tensor: the task vectors' values there, and the inputs'."""

    tensor: TensorInfo
    start: int
    stop: int
    taus: Any  # the task vectors as the rule's ``fn`` gets them (see ``granularity``)
    inputs: dict[str, Iterator[Tensor]]  # per declared input, its checkpoints' chunks


class MergeView(Protocol):
    """What a rule's ``prepare`` sees of a merge: the tensors, and a way to stream over them."""

    num_tasks: int

    def tensors(self) -> list[TensorInfo]: ...  # the merged tensors, in order

    def one_chunk(self, tensor: TensorInfo) -> bool: ...  # the tensor reaches ``fn`` whole

    def chunks(self, tensors: list[TensorInfo]) -> Iterator[Chunk]: ...

    # fn(chunk) for every chunk of ``tensors``, in order, computed by the merge's threads: for passes
    # that reduce each chunk to a small result (a histogram, a sum) that ``fn`` returns
    def map(self, fn: Callable[[Chunk], Any], tensors: list[TensorInfo]) -> Iterator[Any]: ...


@dataclass(frozen=True)
class Prepared:
    kwargs: Callable[[TensorInfo], dict[str, Any]] | None = None  # extra arguments of ``fn`` per tensor
    lam: float | None = None  # the coefficient the rule computed (None: the options' lam)
    info: dict[str, Any] = field(default_factory=dict)  # reported with the result (e.g. {"lambda": ...})


class NoOptions(Options):
    """A rule without options of its own."""


@dataclass(frozen=True)
class Rule:
    name: str
    fn: Callable[..., Tensor]
    granularity: Granularity = "fold"
    lam: float | None = 1.0
    summary: str = ""
    options: type[Options] = NoOptions
    draws: Mapping[str, Draw] = field(default_factory=dict)
    inputs: Mapping[str, Input] = field(default_factory=dict)
    max_models: int | None = None  # e.g. BECAME merges exactly one trained model
    prepare: Callable[[MergeView, Options], Prepared] | None = None
    passes: Callable[[Options], int] = lambda options: 0  # reads ``prepare`` makes (for the progress bar)
    running: Running | None = None  # None: no running form (mergecl learn keeps every task vector)
    propagates_non_finite: bool = False  # True: the engine checks the merged chunk, not each input
    whole_tensors: Callable[[Options], bool] = lambda options: False  # stack rules: tensors whole where they fit
    fold_buffers: int = 1  # chunk-sized fp32 buffers a fold rule holds (the engine sizes its chunks by them)
    picks: bool = False  # stack rules: each entry is one task vector's, chosen blind to the values
    fused: str | None = None  # fold rules: the fused.c step that is ``running.update`` minus the base

    @property
    def continual(self) -> bool:
        """Usable as a CL method over a run's own task vectors (it needs no other checkpoints)."""
        return not self.inputs

    def running_form(self, norms_kept: bool) -> Running | None:
        """The running form, where it can go on without the whole-model ``prepare``: the rule has no
        prepare, or one that only hands out tensor names (``running.named``), or one that computes a
        coefficient the holder recomputes (``running.coefficient``; ``norms_kept``: the holder
        keeps each task vector's norm). No running form for a rule with inputs (Fisher weights)."""
        running = self.running
        if running is None or self.inputs:
            return None
        if self.prepare is None:
            return running
        if running.coefficient is not None:
            return running if norms_kept else None
        return running if running.named else None


RULES: dict[str, Rule] = {}


def register_rule(
    name: str,
    fn: Callable[..., Tensor] | None = None,
    *,
    granularity: Granularity = "fold",
    lam: float | None = 1.0,
    summary: str | None = None,
    options: type[Options] | None = None,
    draws: Mapping[str, Draw] | None = None,
    inputs: Mapping[str, Input] | None = None,
    max_models: int | None = None,
    prepare: Callable[[MergeView, Options], Prepared] | None = None,
    passes: Callable[[Options], int] | None = None,
    running: Running | None = None,
    propagates_non_finite: bool = False,
    whole_tensors: Callable[[Options], bool] | None = None,
    fold_buffers: int = 1,
    picks: bool = False,
    fused: str | None = None,
):
    """Declare merge rule ``name`` (see the module docstring); usable as a decorator.

    The summary defaults to the first line of ``fn``'s docstring. Registering a name twice is an
    error: a plugin cannot silently replace a rule.
    """

    def declare(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if not name.isidentifier():
            raise MergeclError(f"merge rule name {name!r} must be a Python identifier (letters, digits, '_')")
        if name in RULES:
            raise MergeclError(f"merge rule {name!r} is already registered")
        if granularity not in GRANULARITIES:
            raise MergeclError(f"merge rule {name!r}: granularity must be one of {', '.join(GRANULARITIES)}")
        folds = fused in FUSED_STEPS and running is not None and propagates_non_finite
        picks_by_randint = fused == "pick" and picks and len(draws or {}) == 1
        if fused is not None and not (folds or picks_by_randint):
            raise MergeclError(
                f"merge rule {name!r}: fused must name a step of fused.c ({', '.join(FUSED_STEPS)}) of a rule "
                "with a running form that propagates non-finite entries, or be 'pick' for a rule that "
                "picks by one draw of a task index"
            )
        if picks and granularity != "stack":
            raise MergeclError(f"merge rule {name!r}: only a 'stack' rule picks (picks=True)")
        for key, spec in (inputs or {}).items():
            if not isinstance(spec, Input):
                raise MergeclError(f"merge rule {name!r}: input {key!r} must be declared as an Input(...)")
        doc = (fn.__doc__ or "").strip().splitlines()
        RULES[name] = Rule(
            name,
            fn,
            granularity,
            lam,
            summary if summary is not None else (doc[0] if doc else ""),
            options or NoOptions,
            dict(draws or {}),
            dict(inputs or {}),
            max_models,
            prepare,
            passes or (lambda options: 0),
            running,
            propagates_non_finite,
            whole_tensors or (lambda options: False),
            fold_buffers,
            picks,
            fused,
        )
        return fn

    return declare if fn is None else declare(fn)


def get_rule(name: str) -> Rule:
    _load_builtins()
    if name not in RULES:
        load_plugins()  # an installed plugin's rule (entry points, $MERGECL_PLUGINS)
    if name not in RULES:
        raise MergeclError(f"unknown merge method '{name}' (choose from {', '.join(RULES)})")
    return RULES[name]


def all_rules() -> dict[str, Rule]:
    """Every registered rule, the built-in ones first."""
    _load_builtins()
    return RULES


def _load_builtins() -> None:
    # the built-in rules register on import: one module per rule family, one line each
    import mergecl.merging.continual_ties  # noqa: F401
    import mergecl.merging.dop  # noqa: F401
    import mergecl.merging.iso  # noqa: F401
    import mergecl.merging.knots  # noqa: F401
    import mergecl.merging.opcm  # noqa: F401
    import mergecl.merging.rules  # noqa: F401
    import mergecl.merging.ties  # noqa: F401
    import mergecl.merging.tsv  # noqa: F401
