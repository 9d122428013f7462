"""Reading and writing checkpoints tensor by tensor, chunk by chunk.

Readers share one small interface: ``keys()``, ``spec(key) -> (dtype, shape)`` and
``read(key, start, stop)`` returning the flat elements [start, stop) of a tensor in its own dtype.
The safetensors reader parses the header itself and reads byte ranges with plain file reads: no
mmap, so a merge's resident memory is what it holds, not every page of every input it touched.

The writer streams a safetensors file: the header is known in advance from the tensors' dtypes and
shapes, so tensors can be written one chunk at a time in order. Files are written under a temp name
and renamed at the end (mergecl.atomic); a failed merge leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import struct
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from mergecl.atomic import atomic_directory, atomic_open
from mergecl.errors import MergeclError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SHARD_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"


class CheckpointReader(Protocol):
    name: str

    def keys(self) -> list[str]: ...

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]: ...

    def read(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        """Flat elements [start, stop); may fill and return ``out`` (a buffer of that dtype and
        size) or return a read-only view. The caller must not modify the result in place."""
        ...


def numel(shape: Iterable[int]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class StateDictReader:
    """An in-memory state dict; reads are views, no copies."""

    def __init__(self, state: Mapping[str, Tensor], name: str = "<state dict>") -> None:
        self.name = name
        self._state = state
        for key, value in state.items():
            if not isinstance(value, Tensor):
                raise MergeclError(f"{name}: entry '{key}' is a {type(value).__name__}, not a tensor")

    def keys(self) -> list[str]:
        return list(self._state)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        tensor = self._state[key]
        return tensor.dtype, tuple(tensor.shape)

    def read(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        return self._state[key].detach().reshape(-1)[start:stop]


class SafetensorsReader:
    """One .safetensors file, read by byte ranges."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = str(path)
        try:
            self._file = open(self.path, "rb")  # noqa: SIM115 - kept open for ranged reads
            (header_len,) = struct.unpack("<Q", self._file.read(8))
            if header_len > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(self._file.read(header_len))
        except FileNotFoundError:
            raise MergeclError(f"{self.name}: no such file") from None
        except (struct.error, ValueError, UnicodeDecodeError) as err:
            raise MergeclError(f"{self.name}: not a valid safetensors file ({err})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        size = os.path.getsize(self.path)
        for key, entry in header.items():
            dtype = DTYPES.get(entry.get("dtype"))
            if dtype is None:
                raise MergeclError(f"{self.name}: tensor '{key}' has unsupported dtype {entry.get('dtype')}")
            shape = tuple(entry["shape"])
            begin, end = entry["data_offsets"]
            if end - begin != numel(shape) * dtype.itemsize or self._data_start + end > size:
                raise MergeclError(f"{self.name}: tensor '{key}' has a truncated or inconsistent byte range")
            self._entries[key] = (dtype, shape, self._data_start + begin)

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype, shape, _ = self._entries[key]
        return dtype, shape

    def read(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        dtype, _, offset = self._entries[key]
        if out is None or out.dtype != dtype or out.numel() != stop - start:
            out = torch.empty(stop - start, dtype=dtype)
        if out.numel() == 0:
            return out
        view = memoryview(out.view(torch.uint8).numpy())
        got = os.preadv(self._file.fileno(), [view], offset + start * dtype.itemsize)
        if got != len(view):
            raise MergeclError(f"{self.name}: tensor '{key}' is truncated")
        return out

    def close(self) -> None:
        self._file.close()


class ShardedReader:
    """A Hugging Face style checkpoint directory: an index json mapping tensors to shard files."""

    def __init__(self, directory: Path, index_name: str) -> None:
        self.name = str(directory)
        index_path = directory / index_name
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError) as err:
            raise MergeclError(f"{index_path}: not a valid shard index ({err})") from None
        shards: dict[str, CheckpointReader] = {}
        self._owner: dict[str, CheckpointReader] = {}
        for key, shard in weight_map.items():
            if shard not in shards:
                shards[shard] = open_checkpoint(directory / shard)
            if key not in shards[shard].keys():
                raise MergeclError(f"{directory / shard}: tensor '{key}' listed in {index_name} is missing")
            self._owner[key] = shards[shard]

    def keys(self) -> list[str]:
        return list(self._owner)

    def spec(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._owner[key].spec(key)

    def read(self, key: str, start: int, stop: int, out: Tensor | None = None) -> Tensor:
        return self._owner[key].read(key, start, stop, out)


def load_torch_state_dict(path: Path) -> dict[str, Tensor]:
    """A .pt/.bin file loaded with weights_only=True: a pickle that would run code is refused.

    A top-level {"state_dict": {...}} (or {"model": {...}}) wrapper is unwrapped.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except FileNotFoundError:
        raise MergeclError(f"{path}: no such file") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MergeclError(
            f"{path}: refused to load: not a plain tensor checkpoint loadable with weights_only=True "
            f"({first[:160]}); convert it to safetensors from a trusted environment"
        ) from None
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise MergeclError(f"{path}: does not hold a flat dict of tensors")
    return obj


def _is_zip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def open_checkpoint(source: str | os.PathLike | Mapping[str, Tensor], name: str | None = None):
    """A reader for a state dict, a .safetensors file, a .pt/.bin file or a sharded directory."""
    if isinstance(source, Mapping):
        return StateDictReader(source, name or "<state dict>")
    path = Path(source)
    if path.is_dir():
        for index, _ in ((SHARD_INDEX, 0), (TORCH_INDEX, 1)):
            if (path / index).exists():
                return ShardedReader(path, index)
        for single in ("model.safetensors", "pytorch_model.bin"):
            if (path / single).exists():
                return open_checkpoint(path / single)
        raise MergeclError(f"{path}: directory holds no {SHARD_INDEX}, model.safetensors or pytorch_model.bin")
    if not path.exists():
        raise MergeclError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    if path.suffix in (".pt", ".pth", ".bin", ".th", ".ckpt"):
        return StateDictReader(load_torch_state_dict(path), str(path))
    raise MergeclError(f"{path}: unknown checkpoint format (expected .safetensors, .pt, .bin or a directory)")


# --- writing -----------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """'5GB' -> 5e9 bytes (decimal units, as Hugging Face's max_shard_size)."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(text)
    if not match:
        raise MergeclError(f"size '{text}' not understood (examples: 500MB, 5GB)")
    number, unit = match.groups()
    return int(float(number) * 1000 ** "_KMGT".index(unit.upper() or "_"))


def _header(specs: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict) -> bytes:
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for key, dtype, shape in specs:
        nbytes = numel(shape) * dtype.itemsize
        header[key] = {
            "dtype": DTYPE_NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
    return struct.pack("<Q", len(blob)) + blob


def _write_stream(handle, specs, metadata: dict, chunks: Iterator[Tensor]) -> None:
    """Header, then each tensor's bytes pulled chunk by chunk from ``chunks`` (in spec order)."""
    handle.write(_header(specs, metadata))
    for key, dtype, shape in specs:
        left = numel(shape)
        while left > 0:
            chunk = next(chunks)
            if chunk.dtype != dtype or chunk.numel() > left:
                raise RuntimeError(f"chunk for '{key}' does not fit its tensor")
            handle.write(memoryview(chunk.contiguous().view(torch.uint8).numpy()))
            left -= chunk.numel()


def plan_shards(
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Greedy split in order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = numel(spec[2]) * spec[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_checkpoint(
    out: str | os.PathLike,
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
    chunks: Iterable[Tensor],
    metadata: dict,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Stream ``chunks`` (every tensor's flat elements, in the order of ``specs``) to disk, atomically.

    ``out`` ending in .safetensors: one file. Anything else: a directory in the Hugging Face layout,
    ``model.safetensors`` or, above ``max_shard_size``, ``model-0000i-of-0000N.safetensors`` plus
    ``model.safetensors.index.json``. If ``chunks`` raises, nothing is left at ``out``.
    """
    out = Path(out)
    chunks = iter(chunks)
    if out.suffix == ".safetensors":
        with atomic_open(out) as handle:
            _write_stream(handle, specs, metadata, chunks)
        return out
    shards = plan_shards(specs, parse_size(max_shard_size))
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    with atomic_directory(out) as directory:
        for name, shard in zip(names, shards, strict=True):
            with open(directory / name, "wb") as handle:
                _write_stream(handle, shard, metadata, chunks)
                handle.flush()
                os.fsync(handle.fileno())
        if n > 1:
            total = sum(numel(shape) * dtype.itemsize for _, dtype, shape in specs)
            weight_map = {key: name for name, shard in zip(names, shards, strict=True) for key, _, _ in shard}
            index = {"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}
            (directory / SHARD_INDEX).write_text(json.dumps(index, indent=2))
    return out
