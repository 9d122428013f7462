"""The merge engine: applies a rule of ``rules.py`` to whole checkpoints, out of core.

For every tensor of the base checkpoint, in order, and for every chunk of it, the engine reads the
base chunk, then streams the task vectors' chunks (tau_t = theta_t - theta_0, in fp32 or fp64) into
the rule, and emits theta_0 + lam * merged. Folding rules (average, task_arithmetic, magmax,
random_mix, one_over_t, fisher) hold one running result: memory is O(chunk) whatever the number of
checkpoints. TIES holds the T chunks of one position at once (the chunk shrinks as T grows).

Two rules need a whole-model quantity first, found by extra streaming passes:
- ties with scope=global: each task vector's exact k-th smallest |x| over the whole model, found by
  a two-pass radix select on the fp32 bit patterns (2 x 2^16 counters per task), then a pass for
  the model-wide majority sign. Memory: O(T * 2^16) counters plus the chunks; 4 reads in all.
- became: the sums of lam* = sum F d^2 / sum (F + Lambda) d^2 over every merged coordinate.

The same code runs on in-memory state dicts and on files: chunking and random draws depend only on
tensor names, sizes and the seed, so streaming and in-memory merges agree bit for bit.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mergecl.errors import MergeclError
from mergecl.merging import rules
from mergecl.merging.checkpoints import check_output, numel, open_checkpoint, write_checkpoint

RNG_BLOCK = 1 << 16  # random draws are made per block of this many elements: chunking-independent
DEFAULT_CHUNK = 1 << 18  # elements per chunk and input (1 MB fp32): stays in cache, fastest here
STACK_BUDGET = 1 << 25  # elements TIES may hold per chunk position, over all T inputs
LAM_LIMIT = torch.finfo(torch.float32).max
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)

Source = str | os.PathLike | Mapping[str, Tensor]


@dataclass(frozen=True)
class RuleSpec:
    lam: float | None  # default lam; None: the rule has no lam (became computes its own)
    summary: str
    options: tuple[str, ...] = ()


RULES: dict[str, RuleSpec] = {
    "average": RuleSpec(1.0, "theta_0 + lam * mean_t tau_t (weight averaging)"),
    "task_arithmetic": RuleSpec(0.3, "theta_0 + lam * sum_t tau_t"),
    "random_mix": RuleSpec(1.0, "each entry copies tau_k, k uniform at random (seeded)", ("seed",)),
    "magmax": RuleSpec(0.5, "each entry takes the signed tau_t of largest |tau_t|; ties go to the later task"),
    "ties": RuleSpec(0.55, "trim to top `keep` by |x|, elect sign, disjoint mean", ("keep", "scope")),
    "fisher": RuleSpec(1.0, "sum_t F_t tau_t / sum_t F_t (diagonal Fisher weights, needs `fisher`)", ("fisher",)),
    "became": RuleSpec(
        None,
        "theta_gp + lam* (theta_hat - theta_gp), lam* = sum F d^2 / sum (F + Lambda) d^2 "
        "(needs `fisher` and `prior_precision`, one fine-tuned model)",
        ("fisher", "prior_precision"),
    ),
    "one_over_t": RuleSpec(1.0, "running 1/t merge: m += (tau_j - m) / t, t = start, start+1, ...", ("start",)),
}


@dataclass
class MergeOptions:
    method: str
    lam: float | None = None
    keep: float = 0.2
    scope: str = "global"
    seed: int = 0
    dare: float = 0.0
    start: int = 1
    include: str | None = None
    exclude: str | None = None
    chunk_size: int = DEFAULT_CHUNK
    workers: int = 1  # threads computing chunks ahead

    def __post_init__(self) -> None:
        if self.method not in RULES:
            raise MergeclError(f"unknown merge method '{self.method}' (choose from {', '.join(RULES)})")
        spec = RULES[self.method]
        if self.lam is None:
            self.lam = spec.lam
        elif spec.lam is None:
            raise MergeclError(f"method '{self.method}' computes its own coefficient: do not pass lam")
        if self.lam is not None and not (isinstance(self.lam, int | float) and abs(self.lam) <= LAM_LIMIT):
            # lam scales fp32 tensors: a larger one overflows every non-zero entry
            raise MergeclError(f"lam must be a finite number of at most {LAM_LIMIT:.4g} in size, got {self.lam!r}")
        if not 0.0 < self.keep <= 1.0:
            raise MergeclError(f"keep must be in (0, 1], got {self.keep}")
        if self.scope not in ("global", "tensor"):
            raise MergeclError(f"scope must be 'global' or 'tensor', got '{self.scope}'")
        if not 0.0 <= self.dare < 1.0:
            raise MergeclError(f"dare drop probability must be in [0, 1), got {self.dare}")
        if self.start < 1:
            raise MergeclError(f"start must be >= 1, got {self.start}")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise MergeclError(f"workers must be a positive integer, got {self.workers!r}")
        if self.chunk_size < RNG_BLOCK or self.chunk_size % RNG_BLOCK:
            raise MergeclError(f"chunk_size must be a positive multiple of {RNG_BLOCK}")
        for name in ("include", "exclude"):
            pattern = getattr(self, name)
            if pattern is not None:
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise MergeclError(f"--{name} '{pattern}' is not a valid regular expression ({err})") from None

    def selects(self, key: str) -> bool:
        if self.include is not None and not re.search(self.include, key):
            return False
        return not (self.exclude is not None and re.search(self.exclude, key))

    def public(self) -> dict[str, Any]:
        """The options that shape the result (for metadata)."""
        keys = ["lam", "seed", "dare", "include", "exclude", *RULES[self.method].options]
        data = {k: getattr(self, k) for k in keys if hasattr(self, k)}
        return {k: v for k, v in data.items() if v is not None}


@dataclass
class MergeResult:
    state: dict[str, Tensor] | None  # in-memory result (no ``out`` given)
    path: Path | None  # written checkpoint (``out`` given)
    info: dict[str, Any] = field(default_factory=dict)  # e.g. {"lambda": lam*} for became


@dataclass
class _Entry:
    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    merged: bool  # False: copied from the base (non-float, or not selected)

    @property
    def numel(self) -> int:
        return numel(self.shape)


def _all_finite(x: Tensor) -> bool:
    """A finite sum implies finite entries (inf and nan propagate); only a non-finite sum, which
    finite values can also give by overflow, needs the exact check."""
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


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


def _block_seed(seed: int, stream: str, key: str, block: int) -> int:
    return zlib.crc32(f"{seed}:{stream}:{key}:{block}".encode())


def _draw(seed: int, stream: str, key: str, start: int, stop: int, total: int, fn) -> Tensor:
    """Random values for elements [start, stop) of a tensor, the same whatever the chunking.

    ``fn(n, generator)`` draws n values; element i's value comes from block i // RNG_BLOCK.
    """
    parts = []
    generator = torch.Generator()
    first, last = start // RNG_BLOCK, (stop - 1) // RNG_BLOCK
    for block in range(first, last + 1):
        generator.manual_seed(_block_seed(seed, stream, key, block))
        lo = block * RNG_BLOCK
        values = fn(min(RNG_BLOCK, total - lo), generator)
        parts.append(values[max(start - lo, 0) : min(stop - lo, RNG_BLOCK)])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


class _Merge:
    """One merge: readers, validated layout, and the chunk streams the passes share."""

    def __init__(self, base, finetuned, options, fisher, prior_precision, progress, vectors=False) -> None:
        self.options = options
        self.vectors = vectors  # finetuned readers hold task vectors tau_t, not weights theta_t
        self._buffers: dict[tuple, Tensor] = {}
        self.before_entry: Callable[[_Entry], None] = lambda entry: None  # whole-tensor passes
        self.base = base
        self.finetuned = finetuned
        self.fisher = fisher
        self.prior = prior_precision
        self.progress = progress
        self.entries = self._validate()
        merged_numel = sum(e.numel for e in self.entries if e.merged)
        if merged_numel == 0:
            raise MergeclError("no floating-point tensor is selected for merging (check --include/--exclude)")
        t = len(finetuned)
        if options.method == "ties":
            # TIES holds all T chunks of a position: shrink the chunk as T grows.
            budget = max(RNG_BLOCK, (STACK_BUDGET // (t + 2)) // RNG_BLOCK * RNG_BLOCK)
            self.chunk = min(options.chunk_size, budget)
        else:
            self.chunk = options.chunk_size

    def _validate(self) -> list[_Entry]:
        base_keys = self.base.keys()
        known = set(base_keys)
        entries = []
        for key in base_keys:
            dtype, shape = self.base.spec(key)
            merged = dtype.is_floating_point and self.options.selects(key)
            entries.append(_Entry(key, dtype, shape, merged))
        others = [(r, "task vector" if self.vectors else "fine-tuned") for r in self.finetuned]
        others += [(r, "fisher") for r in self.fisher] + ([(self.prior, "prior precision")] if self.prior else [])
        for reader, role in others:
            keys = set(reader.keys())
            for entry in entries:
                if role != "fine-tuned" and not entry.merged and entry.key not in keys:
                    continue  # task vectors and Fishers only need the merged tensors
                if entry.key not in keys:
                    raise MergeclError(
                        f"{reader.name}: missing tensor '{entry.key}' (present in the base {self.base.name})"
                    )
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
                    raise MergeclError(f"{reader.name}: tensor '{extra[0]}' is not in the base {self.base.name}")
        return entries

    # --- chunk streams --------------------------------------------------------------------------

    def chunks(self, entry: _Entry) -> Iterator[tuple[int, int]]:
        for start in range(0, entry.numel, self.chunk):
            yield start, min(start + self.chunk, entry.numel)

    def read_base(self, entry: _Entry, start: int, stop: int) -> Tensor:
        n = stop - start
        raw = self.base.read(entry.key, start, stop, out=self._buffer(("raw", "base"), n, entry.dtype))
        self.progress.update(n * entry.dtype.itemsize)
        return self._buffer(("base",), n, _compute_dtype(entry.dtype)).copy_(raw)

    def _buffer(self, slot: tuple, n: int, dtype: torch.dtype) -> Tensor:
        """A reusable flat buffer: fresh allocations of chunk-sized tensors cost page faults.
        One set per thread (``workers`` > 1 computes chunks in a pool)."""
        slot = (threading.get_ident(), *slot)
        buffer = self._buffers.get(slot)
        if buffer is None or buffer.dtype != dtype or buffer.numel() < n:
            buffer = self._buffers[slot] = torch.empty(max(n, self.chunk), dtype=dtype)
        return buffer[:n]

    def taus(self, entry: _Entry, start: int, stop: int, base: Tensor) -> Iterator[Tensor]:
        """Task-vector chunks, one checkpoint at a time, checked finite, DARE applied.

        Folding rules are done with a chunk before they ask for the next, so all checkpoints share
        one pair of buffers; TIES keeps all T at once and gets a pair per checkpoint.
        """
        n = stop - start
        for t, reader in enumerate(self.finetuned):
            slot = t if self.options.method == "ties" else 0
            dtype = reader.spec(entry.key)[0]
            theta = reader.read(entry.key, start, stop, out=self._buffer(("raw", slot), n, dtype))
            self.progress.update(theta.numel() * theta.dtype.itemsize)
            tau = self._buffer(("tau", slot), n, base.dtype)
            if self.vectors:
                tau.copy_(theta)
            elif theta.dtype in FLOAT8:  # torch does not promote fp8 in arithmetic: widen it first
                tau.copy_(theta).sub_(base)
            else:
                torch.sub(theta, base, out=tau)
            if not _all_finite(tau):
                self._blame_non_finite(entry.key, reader, theta, base)
            if self.options.dare:
                p = self.options.dare
                drop = _draw(
                    self.options.seed,
                    f"dare{t}",
                    entry.key,
                    start,
                    stop,
                    entry.numel,
                    lambda n, g, p=p: torch.rand(n, generator=g) < p,
                )
                tau = rules.dare(tau, drop, p)
            yield tau

    def fishers(self, entry: _Entry, start: int, stop: int, dtype: torch.dtype) -> Iterator[Tensor]:
        for reader in self.fisher:
            fisher = reader.read(entry.key, start, stop).to(dtype)
            self._check_fisher(entry.key, reader, fisher)
            yield fisher

    def _check_fisher(self, key: str, reader, fisher: Tensor) -> None:
        if not torch.isfinite(fisher).all():
            raise MergeclError(f"{reader.name}: tensor '{key}' has NaN/Inf values")
        if (fisher < 0).any():
            raise MergeclError(f"{reader.name}: tensor '{key}' has negative Fisher/precision values")

    def _blame_non_finite(self, key: str, reader, theta: Tensor, base: Tensor) -> None:
        if not torch.isfinite(base).all():
            raise MergeclError(f"{self.base.name}: tensor '{key}' has NaN/Inf values")
        if not torch.isfinite(theta).all():
            raise MergeclError(f"{reader.name}: tensor '{key}' has NaN/Inf values")
        raise MergeclError(f"{reader.name}: tensor '{key}' overflows when subtracted from the base")

    # --- whole-model passes ---------------------------------------------------------------------

    def merged_entries(self) -> Iterator[_Entry]:
        return (e for e in self.entries if e.merged)

    def ties_thresholds(self, entries: list[_Entry]) -> list[float]:
        """Each task vector's exact k-th smallest |x| over ``entries`` (two-pass radix select)."""
        t_count = len(self.finetuned)
        k = rules.ties_kth(sum(e.numel for e in entries), self.options.keep)
        if k <= 0:
            return [0.0] * t_count
        # pass 1: histogram of the high 16 bits of |x| (non-negative floats sort like their bits)
        high = torch.zeros(t_count, 1 << 16, dtype=torch.int64)
        for bits, t in self._abs_bits(entries):
            high[t] += torch.bincount(bits >> 16, minlength=1 << 16)
        cum = high.cumsum(dim=1)
        bins = [int(torch.searchsorted(cum[t], k)) for t in range(t_count)]
        below = [int(cum[t, b - 1]) if b > 0 else 0 for t, b in enumerate(bins)]
        # pass 2: histogram of the low 16 bits inside each task's bin
        low = torch.zeros(t_count, 1 << 16, dtype=torch.int64)
        for bits, t in self._abs_bits(entries):
            inside = bits[(bits >> 16) == bins[t]]
            low[t] += torch.bincount(inside & 0xFFFF, minlength=1 << 16)
        thresholds = []
        for t in range(t_count):
            lo = int(torch.searchsorted(low[t].cumsum(0), k - below[t]))
            bits = torch.tensor([(bins[t] << 16) | lo], dtype=torch.int32)
            thresholds.append(float(bits.view(torch.float32)))
        return thresholds

    def _abs_bits(self, entries: list[_Entry]) -> Iterator[tuple[Tensor, int]]:
        for entry in entries:
            for start, stop in self.chunks(entry):
                base = self.read_base(entry, start, stop)
                for t, tau in enumerate(self.taus(entry, start, stop, base)):
                    yield tau.float().abs_().view(torch.int32), t

    def trim_all(self, taus: Iterator[Tensor], thresholds: Sequence[float]) -> Tensor:
        """[T, n] trimmed task vectors (in a reused buffer) against thresholds found on fp32 bit
        patterns (so fp64 tensors are ranked at fp32 precision)."""
        rows = None
        for t, (tau, threshold) in enumerate(zip(taus, thresholds, strict=True)):
            if rows is None:
                n = tau.numel()
                rows = self._buffer(("trimmed",), len(thresholds) * n, tau.dtype).view(len(thresholds), n)
            torch.mul(tau, rules.at_least(tau.float().abs(), threshold).to(tau.dtype), out=rows[t])
        return rows

    def ties_majority_sign(self, entries: list[_Entry], thresholds: Sequence[float]) -> float:
        """Sign of the sum of elected signs over ``entries`` (given to zero-sum entries)."""
        total = 0
        for entry in entries:
            for start, stop in self.chunks(entry):
                base = self.read_base(entry, start, stop)
                trimmed = self.trim_all(self.taus(entry, start, stop, base), thresholds)
                total += int(torch.sign(trimmed.sum(dim=0)).sum())
        return float((total > 0) - (total < 0))

    def became_lambda(self) -> float:
        numerator = denominator = 0.0
        for entry in self.merged_entries():
            for start, stop in self.chunks(entry):
                base = self.read_base(entry, start, stop)
                (delta,) = self.taus(entry, start, stop, base)
                (fisher,) = self.fishers(entry, start, stop, base.dtype)
                prior = self.prior.read(entry.key, start, stop).to(base.dtype)
                self._check_fisher(entry.key, self.prior, prior)
                num, den = rules.became_sums(delta, fisher, prior)
                numerator += num
                denominator += den
        return rules.became_coefficient(numerator, denominator)

    # --- the merge pass -------------------------------------------------------------------------

    def output(self, rule: Callable[[_Entry, int, int, Tensor], Tensor], lam: float) -> Iterator[Tensor]:
        """theta_0 + lam * rule(...) for every chunk of every tensor, in the output dtype, in order.

        With ``workers`` > 1 a thread pool computes up to 2 x workers chunks ahead (torch and the
        preadv reads release the GIL); each thread has its own buffers, and whole-tensor passes
        (``before_entry``) run in this thread before the tensor's chunks are handed out."""

        def compute(entry: _Entry, start: int, stop: int) -> Tensor:
            if not entry.merged:
                base = self.base.read(entry.key, start, stop)
                self.progress.update(base.numel() * entry.dtype.itemsize)
                return base
            base = self.read_base(entry, start, stop)
            merged = rule(entry, start, stop, base)
            merged = base.add(merged, alpha=lam) if lam != 1.0 else base.add(merged)
            if not _all_finite(merged) or _overflows(merged, entry.dtype):
                raise MergeclError(f"tensor {entry.key!r}: the merged values overflow {entry.dtype}")
            return merged.to(entry.dtype)

        def jobs() -> Iterator[tuple[_Entry, int, int]]:
            for entry in self.entries:
                if entry.merged:
                    self.before_entry(entry)
                for start, stop in self.chunks(entry):
                    yield entry, start, stop

        workers = self.options.workers
        if workers == 1:
            for job in jobs():
                yield compute(*job)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="mergecl-merge") as pool:
            pending: deque[Future] = deque()
            try:
                for job in jobs():
                    pending.append(pool.submit(compute, *job))
                    while len(pending) > 2 * workers:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:  # an error or an abandoned generator: no chunk is left computing
                for future in pending:
                    future.cancel()

    def rule(self, lam_info: dict) -> Callable[[_Entry, int, int, Tensor], Tensor]:
        o = self.options
        t_count = len(self.finetuned)
        if o.method == "average":
            return lambda e, a, b, base: rules.average(self.taus(e, a, b, base))
        if o.method == "task_arithmetic":
            return lambda e, a, b, base: rules.task_arithmetic(self.taus(e, a, b, base))
        if o.method == "magmax":
            return lambda e, a, b, base: rules.magmax(self.taus(e, a, b, base))
        if o.method == "one_over_t":
            return lambda e, a, b, base: rules.one_over_t(self.taus(e, a, b, base), start=o.start)
        if o.method == "became":
            return lambda e, a, b, base: next(self.taus(e, a, b, base))
        if o.method == "fisher":
            return lambda e, a, b, base: rules.fisher_weighted(
                self.taus(e, a, b, base), self.fishers(e, a, b, base.dtype)
            )
        if o.method == "random_mix":

            def mix(e, a, b, base):
                pick = _draw(
                    o.seed,
                    "mix",
                    e.key,
                    a,
                    b,
                    e.numel,
                    lambda n, g: torch.randint(t_count, (n,), generator=g, dtype=torch.int64),
                )
                return rules.random_mix(self.taus(e, a, b, base), pick)

            return mix
        if o.method == "ties":
            scopes: dict[str, tuple[list[float], float]] = {}
            if o.scope == "global":
                entries = list(self.merged_entries())
                thresholds = self.ties_thresholds(entries)
                lam_info["thresholds"] = thresholds
                lam_info["majority_sign"] = self.ties_majority_sign(entries, thresholds)

            def tensor_scope(e):  # a tensor too big for one chunk: its exact threshold by streaming
                if o.scope == "tensor" and e.numel > self.chunk:
                    th = self.ties_thresholds([e])
                    scopes[e.key] = th, self.ties_majority_sign([e], th)

            self.before_entry = tensor_scope

            def ties(e, a, b, base):
                if o.scope == "tensor" and b - a == e.numel:  # whole tensor in hand: the plain rule
                    return rules.ties(self.taus(e, a, b, base), keep=o.keep)
                if o.scope == "global":
                    thresholds, majority = lam_info["thresholds"], lam_info["majority_sign"]
                else:
                    thresholds, majority = scopes[e.key]
                trimmed = self.trim_all(self.taus(e, a, b, base), thresholds)
                return rules.ties_disjoint_mean(trimmed, rules.ties_elect(trimmed, majority))

            return ties
        raise AssertionError(o.method)


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, total_bytes: int):
    if not enabled or os.environ.get("CI"):
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="merging", leave=False)


def merge_checkpoints(
    base: Source,
    finetuned: Sequence[Source],
    method: str = "average",
    *,
    out: str | os.PathLike | None = None,
    fisher: Sequence[Source] | Source | None = None,
    prior_precision: Source | None = None,
    task_vectors: bool = False,
    max_shard_size: str | int = "5GB",
    progress: bool = False,
    force: bool = False,
    **options: Any,
) -> MergeResult:
    """Merge ``finetuned`` checkpoints into ``base`` by ``method``; see ``merge`` for the arguments."""
    if isinstance(finetuned, str | os.PathLike | Mapping):
        finetuned = [finetuned]
    if len(finetuned) == 0:
        raise MergeclError("give at least one fine-tuned checkpoint to merge")
    opts = MergeOptions(method=method, **options)
    if isinstance(fisher, str | os.PathLike | Mapping):
        fisher = [fisher]
    fisher = list(fisher or [])
    if method == "fisher" and len(fisher) != len(finetuned):
        raise MergeclError(f"method 'fisher' needs one Fisher per fine-tuned checkpoint ({len(fisher)} given)")
    if method == "became":
        if len(finetuned) != 1 or len(fisher) != 1 or prior_precision is None:
            raise MergeclError("method 'became' needs exactly one fine-tuned model, one fisher and prior_precision")
    elif prior_precision is not None:
        raise MergeclError(f"prior_precision is only used by method 'became', not '{method}'")
    elif fisher and method != "fisher":
        raise MergeclError(f"fisher is only used by methods 'fisher' and 'became', not '{method}'")

    if out is not None:
        sources = [base, *finetuned, *fisher, *([prior_precision] if prior_precision is not None else [])]
        check_output(out, [src for src in sources if not isinstance(src, Mapping)], force)
    base_reader = open_checkpoint(base, "base")
    ft_readers = [open_checkpoint(src, f"finetuned[{i}]") for i, src in enumerate(finetuned)]
    fisher_readers = [open_checkpoint(src, f"fisher[{i}]") for i, src in enumerate(fisher)]
    prior_reader = open_checkpoint(prior_precision, "prior_precision") if prior_precision is not None else None

    nbytes = sum(numel(base_reader.spec(k)[1]) * base_reader.spec(k)[0].itemsize for k in base_reader.keys())
    passes = 1 + (3 if method == "ties" and opts.scope == "global" else 1 if method == "became" else 0)
    bar = _progress_bar(progress, nbytes * (len(ft_readers) + 1) * passes)
    try:
        job = _Merge(base_reader, ft_readers, opts, fisher_readers, prior_reader, bar, task_vectors)
        info: dict[str, Any] = {}
        lam = opts.lam
        if method == "became":
            lam = info["lambda"] = job.became_lambda()
        chunks = job.output(job.rule(info), lam)
        if out is None:
            state = _collect(job.entries, chunks)
            return MergeResult(state=state, path=None, info=info)
        metadata = {
            "format": "pt",
            "mergecl_method": method,
            "mergecl_options": json.dumps(opts.public(), sort_keys=True),
            "mergecl_inputs": json.dumps([_name(src) for src in [base, *finetuned]]),
            "mergecl_info": json.dumps({k: v for k, v in info.items() if k != "thresholds"}),
        }
        specs = [(e.key, e.dtype, e.shape) for e in job.entries]
        path = write_checkpoint(out, specs, chunks, metadata, max_shard_size)
        return MergeResult(state=None, path=path, info=info)
    finally:
        bar.close()


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
    with weights_only=True). method: one of ``RULES``. Options: lam, keep, scope, seed, dare,
    start, include, exclude (regexes on tensor names), fisher, prior_precision, task_vectors (the
    ``finetuned`` inputs already are task vectors tau_t: they need only the merged tensors), out (path: write a
    safetensors file, or a sharded directory when ``out`` has no .safetensors suffix), force (replace an
    existing ``out``, only if it is an earlier mergecl output), max_shard_size, progress, chunk_size,
    workers (threads computing chunks ahead; same result).

    Returns the merged state dict, or the output path when ``out`` is given.
    """
    result = merge_checkpoints(base, finetuned, method, **options)
    return result.state if result.state is not None else result.path
