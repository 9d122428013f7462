"""Multi-process runs with torch.distributed: one process per device, started by torchrun.

Every process runs the whole recipe on the same global batches (the same seeded order) and takes
its share of each batch (``shard``); DDP averages the gradients, so every process holds the same
weights after every step. Evaluations and Fisher passes are sharded and summed (``all_reduce_sum``);
only the main process (rank 0) writes files. Without torchrun (no ``WORLD_SIZE`` > 1) every
function here is the single-process identity, so the rest of mergecl never branches on it.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; False when not under torchrun."""
    if active():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    use_cuda = torch.cuda.is_available() and os.environ.get("MERGECL_DIST_BACKEND", "") != "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def shutdown() -> None:
    """Leave the process group cleanly (every process, at the end of a command): gloo's threads
    torn down at interpreter exit can abort a process that has already done its work."""
    if active():
        dist.barrier()
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` -> this process's GPU (``cuda:LOCAL_RANK``) in a multi-process run."""
    if device.type == "cuda" and device.index is None and active():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def shard(index: Tensor) -> Tensor:
    """This process's share of a global batch of example indices (strided: sizes differ by <= 1)."""
    return index[rank() :: world_size()]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over processes, in place (NCCL needs it on the GPU: it goes there and back)."""
    if not active():
        return tensor
    comm = tensor.to(_comm_device())
    dist.all_reduce(comm)
    if comm is not tensor:
        tensor.copy_(comm)
    return tensor


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (e.g. the run directory name it chose)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def wrap(module: nn.Module) -> nn.Module:
    """DDP around ``module`` in a multi-process run (gradients averaged during backward); else itself."""
    if not active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = module_device(module)
    device_ids = [device.index] if device.type == "cuda" else None
    # buffers (BatchNorm statistics) stay per process: the zero-shot head's is constant anyway.
    # find_unused_parameters: HF encoders carry parameters the forward never uses (BERT's pooler
    # under mean pooling), which DDP would otherwise wait for forever.
    return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False, find_unused_parameters=True)


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")
