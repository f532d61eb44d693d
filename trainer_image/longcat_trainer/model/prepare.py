"""The loaded DiT made ready to train, in this order (the role torchtitan's `parallelize` plays):

    0. context parallelism (spec.training.contextParallel > 1): the rank's group splits each sample's tokens
    1. LoRA adapters on the spec's targets (the base frozen); every rank draws the same initial adapters
    2. base quantization of the frozen block weights (spec.training.baseQuantization)
    3. offload (spec.training.offload: blocks, model/offload.py): the blocks' frozen weights to host memory,
       the rest of the model to the card
    4. the checkpointing policy of each block (model/recompute.py): as many blocks as the card holds keep their
       self-attention output (then, with room left, their widening matmuls' outputs), the others recompute whole
    5. compile: each block's forward on CUDA (one graph per policy serves all 48 blocks); with offload, the
       weights' streaming sits around it
    6. the LoRA to start from: a checkpoint's when resuming, else spec.lora.initFrom's (whole tensors, so before
       any sharding)
    7. the DDP or FSDP wrap over the ranks

The result is the module the training step calls; `dit` itself stays the unwrapped model (LoRA state,
validation sampling).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from longcat_job.api import JobSpec
from longcat_job.buckets import buckets

from .. import distributed, lora
from ..distributed import World
from . import context_parallel, offload, quantize, recompute

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockPlan:
    """How the blocks run: checkpointing on or off, how many keep what for backward, compiled or not."""

    checkpointing: bool
    kept: recompute.Kept
    compile: bool

    def apply(self, dit: nn.Module, streamed: offload.StreamedBlocks | None = None) -> None:
        """The blocks' forwards for this plan; `streamed`'s weight copies outside them (outside compile and the
        checkpoint, so that recomputation finds the weights the backward hook brought in)."""
        policies = recompute.policies(len(dit.blocks), enabled=self.checkpointing, kept=self.kept)
        recompute.apply(dit.blocks, policies, compile=self.compile)
        if streamed is not None:
            streamed.wrap(dit.blocks)


def largest_sample_tokens(spec: JobSpec) -> int:
    """DiT tokens of the largest micro-batch the spec can make: its biggest bucket at its largest frame count (one token
    per 2x2 patch of each 8x-downsampled latent frame), times the batch size."""
    most = 0
    for dataset in spec.datasets:
        if dataset.type == "video":
            pixels = max(b.height * b.width for b in buckets(dataset.resolution, spec.aspect_bucket_alignment))
            most = max(most, ((max(dataset.frame_counts()) - 1) // 4 + 1) * pixels // (16 * 16))
    return most * spec.training.batch_size


def block_plan(spec: JobSpec, dit: nn.Module, device: torch.device,
               streamed: offload.StreamedBlocks | None = None) -> BlockPlan:
    """Selective checkpointing in as many blocks as the card holds (bench/README.md: at 480x832x93 on an H100,
    35 blocks keeping their attention output take a compiled step from 14.1 s to 12.5 s within 60 GiB; the
    others recompute whole), and regional compile on CUDA, which fuses the float32 norms, modulation and RoPE
    around the matmuls (18.6 s to 14.1 s); on the CPU compile would only add compile time. On an H200 all 48
    blocks keep their attention output and some also their widening matmuls' outputs. With offload the blocks'
    weights are not resident: the plan counts only the ones streamed in at once."""
    tokens = largest_sample_tokens(spec) // spec.training.context_parallel  # each rank holds its share
    kept = recompute.blocks_that_fit(dit, tokens, device,
                                     streamed_bytes=0 if streamed is None else streamed.window_bytes)
    if spec.training.gradient_checkpointing:
        log.info("checkpointing: %d of %d blocks keep their self-attention output, %d of them also their widening "
                 "matmuls' outputs (planned for %d tokens); the others recompute whole",
                 kept.attention, len(dit.blocks), kept.matmuls, tokens)
    return BlockPlan(checkpointing=spec.training.gradient_checkpointing, kept=kept,
                     compile=device.type == "cuda")


def prepare_for_training(
    dit: nn.Module, spec: JobSpec, world: World, *, lora_state: dict[str, torch.Tensor] | None = None
) -> nn.Module:
    """Steps 0-7 of the module docstring on `dit` in place; returns the wrapped module to train.

    With offload `dit` may come on the CPU (train.py loads it there): step 3 moves what stays on the card.
    """
    training = spec.training
    context_parallel.enable(dit, context_parallel.for_world(world))
    torch.manual_seed(training.seed)  # the same LoRA initialisation on every rank (FSDP keeps each rank's shard)
    lora.add_lora(dit, spec.lora)
    torch.manual_seed(training.seed + world.rank)  # dropout differs between ranks
    if training.base_quantization is not None:
        quantize.quantize_base(dit, training.base_quantization)
    streamed = offload.stream_blocks(dit, world.device) if training.offload == "blocks" else None
    block_plan(spec, dit, world.device, streamed).apply(dit, streamed)
    if lora_state is not None:
        lora.load_lora_state(dit, lora_state)
    return distributed.wrap(dit, world, training.parallelism)
