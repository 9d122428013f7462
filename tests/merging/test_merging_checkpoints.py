"""The checkpoint readers: closed when done, and the one way mergecl reads a .safetensors file.

``read_safetensors`` (the whole file, built on ``SafetensorsReader``) is what the model weights
loader and the run directory call, so every .safetensors file mergecl reads is parsed as strictly
and refused with the same one-line errors (the strictness itself: tests/adversarial).
"""

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergecl import MergeclError
from mergecl.experiment.rundir import RunDir
from mergecl.merging.checkpoints import SafetensorsReader, open_checkpoint, read_safetensors
from mergecl.models.weights import read_state_dict


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


needs_proc = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts file descriptors in /proc")


def tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(3, 4, generator=generator),
        "half": torch.randn(5, generator=generator).to(torch.bfloat16),
        "steps": torch.tensor(7, dtype=torch.int64),  # a scalar, as BatchNorm's counter
        "empty": torch.zeros(0, 3),
        "mask": torch.tensor([True, False]),
        "wide": torch.randn(2, 2, generator=generator, dtype=torch.float64),
    }


def sharded(tmp_path: Path) -> Path:
    directory = tmp_path / "sharded"
    directory.mkdir()
    save_file({"a": torch.ones(2)}, str(directory / "one.safetensors"))
    save_file({"b": torch.zeros(3)}, str(directory / "two.safetensors"))
    index = {"weight_map": {"a": "one.safetensors", "b": "two.safetensors"}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def test_read_safetensors_gives_what_the_library_gives(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(tensors(), str(path), metadata={"k": "v"})
    ours, library = read_safetensors(path), load_file(str(path))
    assert list(ours) == list(library)
    for key, value in library.items():
        assert ours[key].dtype == value.dtype and ours[key].shape == value.shape
        assert torch.equal(ours[key], value), key
    ours["w"].add_(1)  # fresh tensors: writable, and the file is untouched
    assert torch.equal(read_safetensors(path)["w"], library["w"])


def test_a_read_fills_the_buffer_it_is_given_and_only_one_it_can_fill(tmp_path):
    path = tmp_path / "x.safetensors"
    value = torch.arange(12, dtype=torch.float32).bfloat16()
    save_file({"w": value}, str(path))
    with SafetensorsReader(path) as reader:
        buffer = torch.full((5,), -1.0, dtype=torch.bfloat16)
        got = reader.read("w", 3, 8, out=buffer)
        assert got.data_ptr() == buffer.data_ptr() and torch.equal(buffer, value[3:8])
        # not contiguous, another dtype, another size: a fresh tensor, and the buffer untouched
        strided = torch.full((10,), -1.0, dtype=torch.bfloat16)[::2]
        for out in (strided, torch.zeros(5), torch.zeros(4, dtype=torch.bfloat16)):
            before = out.clone()
            got = reader.read("w", 3, 8, out=out)
            assert got.data_ptr() != out.data_ptr() and torch.equal(got, value[3:8])
            assert torch.equal(out, before)


@needs_proc
def test_readers_close_their_files(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file(tensors(), str(path))
    before = open_fds()
    with open_checkpoint(path) as reader:
        assert len(open_fds()) == len(before) + 1
        assert torch.equal(reader.read("w", 0, 12).reshape(3, 4), load_file(str(path))["w"])
    assert open_fds() == before
    with pytest.raises(ValueError):  # a closed reader reads nothing
        reader.read("w", 0, 1)
    reader.close()  # closing twice is harmless

    reader = open_checkpoint(sharded(tmp_path))
    assert len(open_fds()) == len(before) + 2
    reader.close()
    assert open_fds() == before
    with open_checkpoint({"a": torch.ones(1)}) as memory:  # a state dict's reader holds nothing
        assert memory.keys() == ["a"]

    read_safetensors(path)
    assert open_fds() == before


@needs_proc
def test_a_refused_checkpoint_leaves_no_file_open(tmp_path):
    before = open_fds()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MergeclError):
        read_safetensors(bad)
    directory = sharded(tmp_path)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "one.safetensors", "b": "two.safetensors", "c": "two.safetensors"}})
    )
    with pytest.raises(MergeclError, match="tensor 'c' listed in model.safetensors.index.json is missing"):
        open_checkpoint(directory)
    assert open_fds() == before


def malformed(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Damaged files and the error after '<file>: ' that every reader gives for them."""
    f32 = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    cases = {
        "junk": (b"not a safetensors file", "not a valid safetensors file (header length"),
        "truncated": (json.dumps({"w": f32}).encode(), "tensor 'w' is truncated"),
        "gap": (json.dumps({"w": {**f32, "data_offsets": [8, 24]}}).encode(), "leaves a gap"),
        "duplicate": (
            b'{"w":{"dtype":"F32","shape":[4],"shape":[4],"data_offsets":[0,16]}}',
            "duplicate key 'shape'",
        ),
    }
    files = {}
    for name, (blob, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if name == "junk":
            path.write_bytes(blob)
        else:
            data = bytes(10) if name == "truncated" else bytes(24 if name == "gap" else 16)
            path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
        files[name] = (path, message)
    return files


def test_every_safetensors_read_gives_the_same_errors(tmp_path):
    for name, (path, message) in malformed(tmp_path).items():
        for read in (read_safetensors, RunDir.load_tensors, read_state_dict, open_checkpoint):
            with pytest.raises(MergeclError) as caught:
                read(path)
            assert str(caught.value).startswith(f"{path}: ") and message in str(caught.value), (name, read)


@pytest.mark.skipif(sys.platform == "win32" or not hasattr(os, "mkfifo"), reason="needs a FIFO")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(MergeclError, match="pipe.safetensors: not a regular file"):
        SafetensorsReader(fifo)
    with pytest.raises(MergeclError, match="pipe.safetensors: not a regular file"):
        RunDir.load_tensors(fifo)
    with pytest.raises(MergeclError, match="absent.safetensors: no such file"):
        read_safetensors(tmp_path / "absent.safetensors")
