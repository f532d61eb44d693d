"""The loaded DiT made ready to train, in this order (the role torchtitan's `parallelize` plays):

    1. LoRA adapters on the spec's targets (the base frozen); every rank draws the same initial adapters
    2. base quantization of the frozen block weights (spec.training.baseQuantization)
    3. the checkpointing policy of each block (model/recompute.py)
    4. compile: each block's forward on CUDA (one graph serves all 48 blocks)
    5. a checkpoint's LoRA weights, when resuming (whole tensors, so before any sharding)
    6. the DDP or FSDP wrap over the ranks

The result is the module the training step calls; `dit` itself stays the unwrapped model (LoRA state,
validation sampling).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from longcat_job.api import JobSpec

from .. import distributed, lora
from ..distributed import World
from . import quantize, recompute


@dataclass(frozen=True)
class BlockPlan:
    """How the blocks run: checkpointing on or off, how many keep their self-attention output, compiled or not."""

    checkpointing: bool
    attention_kept_blocks: int
    compile: bool

    def apply(self, dit: nn.Module) -> None:
        policies = recompute.policies(len(dit.blocks), enabled=self.checkpointing,
                                      attention_kept_blocks=self.attention_kept_blocks)
        recompute.apply(dit.blocks, policies, compile=self.compile)


def block_plan(spec: JobSpec, device: torch.device) -> BlockPlan:
    # Regional compile fuses the float32 norms, modulation and RoPE around the matmuls (bench/README.md: a
    # 480x832x93 step from 18.6 s to 14.1 s on an H100); on the CPU it would only add compile time.
    return BlockPlan(checkpointing=spec.training.gradient_checkpointing, attention_kept_blocks=0,
                     compile=device.type == "cuda")


def prepare_for_training(
    dit: nn.Module, spec: JobSpec, world: World, *, lora_state: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """Steps 1-6 of the module docstring on `dit` in place; returns the wrapped module to train."""
    training = spec.training
    torch.manual_seed(training.seed)  # the same LoRA initialisation on every rank (FSDP keeps each rank's shard)
    lora.add_lora(dit, spec.lora)
    torch.manual_seed(training.seed + world.rank)  # dropout differs between ranks
    if training.base_quantization is not None:
        quantize.quantize_base(dit, training.base_quantization)
    block_plan(spec, world.device).apply(dit)
    if lora_state is not None:
        lora.load_lora_state(dit, lora_state)
    return distributed.wrap(dit, world, training.parallelism)
