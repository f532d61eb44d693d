"""What each DiT block keeps for backward (activation checkpointing), and where its compiled region begins.

A block's forward is replaced by one built from its own, in one of three shapes:

    Recompute.NOTHING            forward                       (compiled when asked)
    Recompute.ALL                checkpoint(compiled forward)  keeps only its input, runs again whole in backward
    Recompute.ALL_BUT_ATTENTION  compiled(checkpoint(forward, policy))  also keeps its self-attention output

Whole-block recomputation sits around the compiled block (bench/README.md measured it so); selective
checkpointing sits inside it, so that the compiler's partitioner follows the policy. With gradients off
(validation sampling) nothing is checkpointed. Module names do not change: LoRA, quantization, state dicts and
FSDP see the blocks as they are.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)


class Recompute(enum.Enum):
    NOTHING = "nothing"
    ALL = "all"
    ALL_BUT_ATTENTION = "all-but-attention"


# The attention ops that F.scaled_dot_product_attention dispatches to, one per kernel.
SDPA_OPS = frozenset(
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)
)


def _keep_self_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Save the outputs (and softmax statistics) of self-attention, recompute everything else.

    At 37k tokens self-attention is over half of the block's FLOPs but its output is one [N, C] tensor, so
    keeping it removes most of the recomputation for ~1/16 of the block's activation memory. Self-attention is
    told apart from cross-attention by its keys: at least as many as its queries (text has at most 512).
    """
    if op in SDPA_OPS and args[1].shape[-2] >= args[0].shape[-2]:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def policies(depth: int, *, enabled: bool, attention_kept_blocks: int) -> list[Recompute]:
    """Per block: the first `attention_kept_blocks` keep their self-attention output, the others recompute all."""
    if not enabled:
        return [Recompute.NOTHING] * depth
    kept = max(0, min(depth, attention_kept_blocks))
    return [Recompute.ALL_BUT_ATTENTION] * kept + [Recompute.ALL] * (depth - kept)


# What one block's backward holds at its peak beyond the saved inputs, in [tokens, hidden] tensors (fitted on the
# H100 at 480x832 with 33, 61 and 93 frames).
BACKWARD_WORKING_SET = 34
# The share of the card a training step may plan for: the rest is for the allocator's fragmentation and for
# validation sampling. On an 80 GB card a 480x832x93 step then peaks under 60 GiB.
CARD_FRACTION = 0.75


def attention_blocks_that_fit(dit: nn.Module, tokens: int, device: torch.device, *, streamed_bytes: int = 0) -> int:
    """How many blocks can keep their self-attention output for a micro-batch of `tokens` DiT tokens.

    Memory model: what is allocated now (weights, adapters, quantized copies) + `streamed_bytes` (block weights
    that come and go: with offload the blocks' weights are not allocated now, but the running block's and the
    next one's are at the peak) + every block's saved input + one block's backward working set + per block that
    keeps its attention, its output and float32 log-sum-exp (~0.3 GiB each at 37k tokens). Off the GPU memory is
    not the limit: every block keeps it.
    """
    depth = len(dit.blocks)
    if device.type != "cuda":
        return depth
    config = dit.config
    width = config.hidden_size * dit.x_embedder.proj.weight.element_size()
    # A process capped by set_per_process_memory_fraction plans for its cap (bench --card-gib: a smaller card).
    card = torch.cuda.mem_get_info(device)[1] * torch.cuda.get_per_process_memory_fraction(device)
    budget = CARD_FRACTION * card
    needed = torch.cuda.memory_allocated(device) + streamed_bytes + tokens * width * (depth + BACKWARD_WORKING_SET)
    per_block = tokens * (width + 4 * config.num_heads)
    return int(max(0, min(depth, (budget - needed) // per_block)))


def _when_grad(wrapped: Callable, plain: Callable) -> Callable:
    """`wrapped` while autograd records, `plain` otherwise."""

    def forward(*args: object) -> torch.Tensor:
        return wrapped(*args) if torch.is_grad_enabled() else plain(*args)

    return forward


def block_forward(forward: Callable, recompute: Recompute, *, compile: bool) -> Callable:
    """A block's forward wrapped for `recompute`, its compiled region included when `compile`."""
    if recompute is Recompute.ALL_BUT_ATTENTION:
        context_fn = functools.partial(create_selective_checkpoint_contexts, _keep_self_attention)
        selective = functools.partial(checkpoint, forward, use_reentrant=False, context_fn=context_fn)
        inner = _when_grad(selective, forward)
        return torch.compile(inner) if compile else inner
    inner = torch.compile(forward) if compile else forward
    if recompute is Recompute.ALL:
        return _when_grad(functools.partial(checkpoint, inner, use_reentrant=False), inner)
    return inner


def apply(blocks: Sequence[nn.Module], recompute: Sequence[Recompute], *, compile: bool) -> None:
    """Give each block the forward of its policy, built from its class's forward (so applying again replaces it)."""
    for block, policy in zip(blocks, recompute, strict=True):
        block.forward = block_forward(type(block).forward.__get__(block), policy, compile=compile)
