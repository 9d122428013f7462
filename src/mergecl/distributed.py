"""Multi-process runs with torch.distributed: one process per device, started by torchrun.

Every process runs the whole recipe on the same global batches (the same seeded order) and takes
its share of each batch (``shard``); DDP averages the gradients, so every process holds the same
weights after every step. Evaluations and Fisher passes are sharded and summed (``all_reduce_sum``);
only the main process (rank 0) writes files. Without torchrun (no ``WORLD_SIZE`` > 1) every
function here is the single-process identity, so the rest of mergecl never branches on it.

``train.shard: full`` trains an FSDP2-sharded copy of the model instead (``sharded``): each process
holds 1/N of its weights, gradients and optimiser state while a task trains, and the gathered
weights go back into the model after it. What the training's hooks read of the copy may be sharded
(DTensors): ``laid_out_like``, ``local`` and ``gathered`` let them work on any tensor alike.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mergecl.errors import MergeclError
from mergecl.launch import STORE


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group the environment describes (torchrun's, or ``--nproc``'s: launch.py);
    False when there is none."""
    if active():
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return False
    use_cuda = torch.cuda.is_available() and os.environ.get("MERGECL_DIST_BACKEND", "") != "gloo"
    if use_cuda:
        local_rank, devices = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local_rank >= devices:  # NCCL runs one process per GPU
            raise MergeclError(
                f"this machine has {devices} CUDA device(s), one per process: run at most {devices} processes "
                f"here (--nproc {devices}), or MERGECL_DIST_BACKEND=gloo"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if use_cuda else "gloo"
    if os.environ.get(STORE):  # --nproc: the launcher holds the store (no process binds a port)
        host, port = os.environ[STORE].rsplit(":", 1)
        store = dist.TCPStore(host, int(port), world, is_master=False)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world)
    else:
        dist.init_process_group(backend)
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
    """DDP around ``module`` in a multi-process run (gradients averaged during backward); else itself
    (also an FSDP-sharded module: it reduces its gradients itself)."""
    if not active() or _is_sharded_module(module):
        return module
    from torch.nn.parallel import DistributedDataParallel

    device = module_device(module)
    device_ids = [device.index] if device.type == "cuda" else None
    # buffers (BatchNorm statistics) stay per process: the zero-shot head's is constant anyway.
    # static_graph: HF encoders carry parameters the forward never uses (BERT's pooler under mean
    # pooling), which DDP would otherwise wait for forever. A static graph finds them in its first
    # step; find_unused_parameters would search the graph at every step, and warn from every
    # process of every task wherever all parameters are used (an MLP, a LoRA).
    with warnings.catch_warnings():
        # torch 2.13 deprecates broadcast_buffers for forward_sync_buffers, which would still send
        # rank 0's buffers to every process at each wrap (once per task): torch's own advice is to
        # keep broadcast_buffers=False until it can turn that off too (init_sync_buffers)
        warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
        return DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False, static_graph=True)


def module_device(module: nn.Module) -> torch.device:
    for tensor in module.parameters():
        return tensor.device
    return torch.device("cpu")


# --- FSDP2 (train.shard: full) ------------------------------------------------------------------


@contextmanager
def sharded(module: nn.Module, shard: str) -> Iterator[nn.Module]:
    """The module to train: for ``shard == "full"`` in a multi-process run, an FSDP2-sharded copy of
    ``module`` whose gathered weights are loaded back into ``module`` when the block ends without an
    error; meanwhile ``module``'s own weights wait in host memory. Else ``module`` itself."""
    if shard != "full" or not active():
        yield module
        return
    device = module_device(module)
    module.to("cpu")  # the device holds the shards, not a second full copy
    try:
        trained = fully_sharded(copy.deepcopy(module), device)
        yield trained
        module.load_state_dict(full_state_dict(trained))
    finally:
        module.to(device)


def fully_sharded(module: nn.Module, device: torch.device) -> nn.Module:
    """``module`` sharded in place by FSDP2 over every process, on ``device``: each repeated block
    (``shard_units``) is a unit of its own, all-gathered only while it computes; the rest is the root's."""
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise MergeclError(f"train.shard: full needs FSDP2 (torch >= 2.6), not torch {torch.__version__}") from None
    _check_one_trained_dtype(module)
    mesh = init_device_mesh(device.type, (world_size(),))
    try:
        for unit in shard_units(module):
            fully_shard(unit, mesh=mesh)
        fully_shard(module, mesh=mesh)
    except (AssertionError, NotImplementedError, RuntimeError, TypeError, ValueError) as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise MergeclError(f"{_CANNOT}: {reason}; use shard: optimizer") from None
    return module


_CANNOT = "train.shard: full: FSDP2 cannot shard this model"


def _check_one_trained_dtype(module: nn.Module) -> None:
    """FSDP2 wants the trained weights of a unit in one dtype; it would fail only at the first forward."""
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters() if p.requires_grad})
    if len(dtypes) > 1:
        raise MergeclError(f"{_CANNOT}: its trained weights have several dtypes ({', '.join(dtypes)})")


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``module``: every element of an ``nn.ModuleList`` or ``nn.Sequential``
    (transformer layers, residual blocks, an MLP's layers) that holds parameters, shares none with
    the rest of the model (tied weights stay in the root's unit) and is not inside another block."""
    uses = _parameter_uses(module)
    units: list[nn.Module] = []
    inside: set[nn.Module] = set()  # the modules of the units found so far
    for container in module.modules():  # outer containers first
        if container in inside or not isinstance(container, (nn.ModuleList, nn.Sequential)):
            continue
        for block in container.children():
            own = _parameter_uses(block)
            if own and all(uses[param] == count for param, count in own.items()):
                units.append(block)
                inside.update(block.modules())
    return units


def _parameter_uses(module: nn.Module) -> Counter[int]:
    """How many times each parameter (by id) is registered in ``module`` (a tied one: more than once)."""
    return Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """``module``'s state with every sharded tensor gathered (every process takes part), in host
    memory: one tensor at a time is whole on the device."""
    return {key: gathered(value).detach().cpu() for key, value in module.state_dict().items()}


def gathered(tensor: Tensor) -> Tensor:
    """The whole tensor of a sharded one (a DTensor: every process takes part), reduced if it is a
    partial sum; a plain tensor itself."""
    return tensor.full_tensor() if _is_dtensor(tensor) else tensor


def local(tensor: Tensor) -> Tensor:
    """This process's shard of a sharded tensor (a view: writing it writes the DTensor); a plain
    tensor itself."""
    return tensor.to_local() if _is_dtensor(tensor) else tensor


def laid_out_like(tensor: Tensor, reference: Tensor) -> Tensor:
    """A whole tensor (e.g. a copy of a weight taken before training) laid out as ``reference``:
    sharded as it is when it is a DTensor (this process's slice, no communication), else on its device."""
    if not _is_dtensor(reference):
        return tensor.to(reference.device)
    from torch.distributed.tensor import distribute_tensor

    mesh, placements = reference.device_mesh, reference.placements
    return distribute_tensor(tensor.to(reference.device), mesh, placements, src_data_rank=None)


def _is_dtensor(tensor: Tensor) -> bool:
    if not active():  # torch.distributed.tensor is imported only where it can occur
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # an older torch: no FSDP2, so nothing is sharded
        return False
    return isinstance(tensor, DTensor)


def _is_sharded_module(module: nn.Module) -> bool:
    return any(_is_dtensor(p) for p in module.parameters())
