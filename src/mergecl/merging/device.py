"""Moving a merge's chunks between the host and the device that computes (``device: cuda``).

``Staging`` carries every chunk a rule computes on from the host to the device and every merged
chunk back, through pinned host buffers, so that the engine's one thread keeps reading while the
device transfers and computes:

- uploads: a chunk is read (preadv) into one of the two pinned buffers of its slot (base, theta,
  an input, a draw), copied to a fresh device tensor with ``non_blocking=True`` on the upload
  stream, and the compute stream waits for that copy on the device, not on the host. The host only
  waits before it refills a pinned buffer, for the copy out of it two uses earlier;
- downloads: a merged chunk (and the chunk's checks, one bool) is copied into one of two pinned
  output buffers on the download stream, after the compute; the engine hands it to the writer only
  once that copy is done (``Landing.wait``), a chunk later, while the device computes the next one.

On the CPU (the engine's tests: ``engine.STAGE_CPU``) the same code runs with ordinary buffers, and
streams and events that have nothing to wait for (``_Done``): the transfers are plain copies, the
buffer rotation and the order of the chunks the same.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mergecl.errors import MergeclError

DEVICE_PATTERN = re.compile(r"cpu|cuda(:\d+)?")


def resolve_device(text: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a torch device; a CUDA device this machine lacks is a MergeclError."""
    if not DEVICE_PATTERN.fullmatch(text):
        raise MergeclError(f"device {text!r}: expected cpu, cuda or cuda:N")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeclError(f"device {text}: CUDA is not available here (torch {torch.__version__}); use cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise MergeclError(f"device {text}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


class _Done:
    """The CPU's stream and event: a copy on the CPU is over when it returns."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


@dataclass
class Landing:
    """A merged chunk on its way back: ``host`` (a pinned buffer) holds it once ``wait()`` returns."""

    host: Tensor
    ok: Tensor  # the chunk's checks, all passed (a one-element bool, filled with ``host``)
    done: Any  # the event recorded after both copies

    def wait(self) -> bool:
        """Block until the chunk is on the host; whether its checks passed."""
        self.done.synchronize()
        return bool(self.ok)


class _PinnedPair:
    """Two host buffers used in turn, each with the event of the last copy out of (or into) it."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self.buffers: list[Tensor | None] = [None, None]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def next(self, n: int, dtype: torch.dtype) -> Tensor:
        """The other buffer, as ``n`` elements of ``dtype``, once its last copy is done."""
        self.turn = 1 - self.turn
        event = self.events[self.turn]
        if event is not None:
            event.synchronize()
        size = n * dtype.itemsize
        raw = self.buffers[self.turn]
        if raw is None or raw.numel() < size:
            raw = self.buffers[self.turn] = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
        return raw[:size].view(dtype)

    def mark(self, event) -> None:
        """The copy out of (or into) the buffer ``next`` gave last is done when ``event`` is."""
        self.events[self.turn] = event


class Staging:
    """Uploads to and downloads from ``device`` (see the module docstring); one per merge pass."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.compute = torch.cuda.current_stream(device) if self.cuda else _Done()
        self.uploads = torch.cuda.Stream(device) if self.cuda else _Done()
        self.downloads = torch.cuda.Stream(device) if self.cuda else _Done()
        self._pairs: dict[Any, _PinnedPair] = {}

    def _pair(self, slot: Any) -> _PinnedPair:
        if slot not in self._pairs:
            self._pairs[slot] = _PinnedPair(pinned=self.cuda)
        return self._pairs[slot]

    def load(self, slot: Any, n: int, dtype: torch.dtype, fill: Callable[[Tensor], Tensor]) -> Tensor:
        """``fill(buffer)`` (it fills the host buffer it gets, or returns the values to copy there) on
        the device: a fresh tensor the compute stream may use at once."""
        pair = self._pair(slot)
        host = pair.next(n, dtype)
        values = fill(host)
        if values.data_ptr() != host.data_ptr():  # a reader's view (a state dict): copy it in
            host.copy_(values)
        with self._on(self.uploads):
            moved = host.to(self.device, non_blocking=True, copy=True)
            copied = self._event(self.uploads)
        pair.mark(copied)
        self.compute.wait_event(copied)  # on the device: the host goes on
        self._keep(moved, self.compute)
        return moved

    def upload(self, slot: Any, values: Tensor) -> Tensor:
        """A host tensor (a random draw) on the device."""
        return self.load(slot, values.numel(), values.dtype, lambda host: values.reshape(-1)).view(values.shape)

    def download(self, merged: Tensor, ok: Tensor) -> Landing:
        """Start copying a computed chunk and its checks back; ``Landing.wait`` finishes."""
        outs, flags = self._pair("out"), self._pair("ok")
        out, flag = outs.next(merged.numel(), merged.dtype), flags.next(1, torch.bool)
        self.downloads.wait_stream(self.compute)  # after the chunk's computing
        with self._on(self.downloads):
            out.copy_(merged.reshape(-1), non_blocking=True)
            flag.copy_(ok.reshape(1), non_blocking=True)
            done = self._event(self.downloads)
        outs.mark(done)
        flags.mark(done)
        self._keep(merged, self.downloads)
        self._keep(ok, self.downloads)
        return Landing(out, flag, done)

    def _on(self, stream) -> contextlib.AbstractContextManager:
        """Work queued in this block goes to ``stream``."""
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def _event(self, stream) -> Any:
        """An event that completes when the work queued on ``stream`` so far is done."""
        if not self.cuda:
            return _Done()
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _keep(self, tensor: Tensor, stream) -> None:
        """Keep ``tensor``'s memory from reuse until ``stream`` is done with it (CUDA's caching
        allocator only knows the stream that allocated it)."""
        if self.cuda:
            tensor.record_stream(stream)
