"""An exponential moving average of the adapter weights (spec.training.ema).

    ema = decay * ema + (1 - decay) * w        after every `everySteps`-th optimizer step

The average is float32, one tensor per trainable parameter (each rank's shard under FSDP), on the GPU or the
CPU as the spec says. It is saved in checkpoints keyed by parameter name as whole tensors, so a resumed run
continues from the same numbers; `applied()` puts it into the model for the time of an export or a validation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from longcat_job.api import EmaSpec

from .distributed import full_tensor


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of a parameter: its shard under FSDP, the parameter itself otherwise."""
    return param.to_local() if isinstance(param, DTensor) else param


def _shard_like(param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """The part of a whole tensor that this rank holds of `param`."""
    if isinstance(param, DTensor):
        return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements).to_local()
    return whole


class AdapterEMA:
    def __init__(self, model: nn.Module, spec: EmaSpec, device: torch.device) -> None:
        self.decay, self.every = spec.decay, spec.every_steps
        self.named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        where = torch.device("cpu") if spec.device == "cpu" else device
        self.average = [_local(p).detach().to(where, torch.float32, copy=True) for _, p in self.named]

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.every == 0:
            for average, (_, param) in zip(self.average, self.named):
                average.lerp_(_local(param).to(average.device, torch.float32), 1 - self.decay)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Within it the model's adapters hold the average; the trained weights come back after."""
        with torch.no_grad():
            trained = [_local(p).detach().clone() for _, p in self.named]
            for average, (_, param) in zip(self.average, self.named):
                _local(param).copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for weights, (_, param) in zip(trained, self.named):
                    _local(param).copy_(weights)

    def state(self) -> dict[str, torch.Tensor]:
        """Whole tensors by parameter name, on the CPU (a collective under FSDP: every rank calls it)."""
        with self.applied():
            return {name: full_tensor(p).detach().to("cpu", torch.float32, copy=True) for name, p in self.named}

    @torch.no_grad()
    def load(self, state: dict[str, torch.Tensor]) -> None:
        missing = [name for name, _ in self.named if name not in state]
        if missing:
            raise KeyError(f"the checkpoint's EMA lacks {missing[:3]}")
        for average, (name, param) in zip(self.average, self.named):
            average.copy_(_shard_like(param, state[name]))
