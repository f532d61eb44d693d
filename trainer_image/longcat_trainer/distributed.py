"""The torchrun environment: one process per GPU (or CPU process), nccl on GPUs and gloo on the CPU.

Without torchrun's variables the trainer runs as a single process with no process group; the helpers
below then do the single-process thing, so the rest of the code never asks which case it is in.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from longcat_job.failures import InvalidConfigError

T = TypeVar("T")
# Caching on a slow rank can take a long time before the next collective; don't let gloo/nccl give up.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class World:
    """This process's place: its rank, and its context-parallel group (consecutive ranks, so within a pod).

    The ranks of a context-parallel group train one sample together; the groups are the data-parallel
    replicas (data_parallel_rank of data_parallel_size), and gradients are averaged over the whole world.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    context_parallel: int = 1
    context_group: dist.ProcessGroup | None = None

    @property
    def context_rank(self) -> int:
        return self.rank % self.context_parallel

    @property
    def data_parallel_rank(self) -> int:
        return self.rank // self.context_parallel

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.context_parallel

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def init_world(context_parallel: int = 1) -> World:
    """The process group from torchrun's variables, split into groups of `context_parallel` consecutive ranks."""
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        device_id = device if device.type == "cuda" else None
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, device_id=device_id)
    if world_size % context_parallel:
        raise InvalidConfigError(
            f"spec.training.contextParallel={context_parallel} must divide the {world_size} training processes "
            "(nodes x gpusPerNode): make gpusPerNode a multiple of it"
        )
    group = dist.new_subgroups(group_size=context_parallel)[0] if context_parallel > 1 else None
    return World(rank, world_size, local_rank, device, context_parallel, group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def gather_objects(value: T) -> list[T]:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: T) -> T:
    """Rank 0's `value` on every rank."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_across_ranks(value: torch.Tensor, device: torch.device) -> float:
    """The mean over the ranks of a one-element tensor, as a float: one host sync."""
    if not dist.is_initialized():
        return value.item()
    tensor = value.detach().to(device, torch.float64, copy=True).reshape(1)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is True on at least one (e.g. a SIGTERM seen by one process)."""
    if not dist.is_initialized():
        return flag
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def wrap(model: nn.Module, world: World, parallelism: str) -> nn.Module:
    """Spread the model over the ranks; only the trainable (LoRA) parameters are ever all-reduced.

    ddp: every rank holds the whole frozen base (the default). fsdp: each block's weights are sharded over
    the ranks (FSDP2 `fully_shard`), for GPUs too small for a replica; the optimizer must be made after this.
    """
    if world.world_size == 1:
        return model
    if parallelism == "fsdp":
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        return model
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # Every rank loads the same base from the same files and seeds its adapters alike (train.py), so DDP's
    # first broadcast would send 27 GB of frozen weights for nothing, and its per-forward buffer broadcast
    # would resend the 8-bit base weights (quantize.py keeps them as buffers) every step.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, init_sync=False, broadcast_buffers=False)


def accumulating(model: nn.Module) -> contextlib.AbstractContextManager:
    """Within it, a backward pass only accumulates local gradients (no all-reduce until the last micro-batch)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()  # FSDP2 and single processes: reduce every micro-batch (correct, less lean)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a collective: every rank must call it), or the tensor itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state keyed by parameter names, on the CPU (a collective under FSDP)."""
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
