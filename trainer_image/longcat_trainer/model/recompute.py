"""What each DiT block keeps for backward (activation checkpointing), and where its compiled region begins.

A block's forward is replaced by one built from its own, in one of three shapes:

    Recompute.NOTHING            forward                       (compiled when asked)
    Recompute.ALL                checkpoint(compiled forward)  keeps only its input, runs again whole in backward
    Recompute.ALL_BUT_ATTENTION  compiled(checkpoint(forward, policy))  also keeps its self-attention output
    Recompute.ELEMENTWISE        compiled(checkpoint(forward, policy))  also keeps the widening matmuls' outputs

Whole-block recomputation sits around the compiled block (bench/README.md measured it so); selective
checkpointing sits inside it, so that the compiler's partitioner follows the policy. With gradients off
(validation sampling) nothing is checkpointed. Module names do not change: LoRA, quantization, state dicts and
FSDP see the blocks as they are.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    ELEMENTWISE = "elementwise"


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


MATMUL_OPS = frozenset(
    getattr(torch.ops.aten, name).default for name in ("mm", "addmm", "_scaled_mm") if hasattr(torch.ops.aten, name)
)


def _keep_attention_and_widening_matmuls(width: int, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Also save the outputs of the matmuls that read the token stream (`width` wide) and widen it: attention qkv,
    SwiGLU w1 and w3.

    Their outputs feed the q/k norms, RoPE and the SwiGLU product, whose backward needs them, so otherwise they are
    recomputed: about 10 of the 12 TFLOP a block recomputes at 37k tokens. Narrowing and square matmuls (proj, w2,
    the cross-attention's) feed the residual adds, which need no output of theirs in backward; the LoRA factors'
    products (reduction over the rank) cost next to nothing to recompute.
    """
    if op in MATMUL_OPS:
        b = args[2] if op is torch.ops.aten.addmm.default else args[1]  # [K, out]
        if b.shape[-2] == width < b.shape[-1]:
            return CheckpointPolicy.MUST_SAVE
    return _keep_self_attention(ctx, op, *args, **kwargs)


def _policy_fn(recompute: Recompute, width: int) -> Callable:
    if recompute is Recompute.ELEMENTWISE:
        return functools.partial(_keep_attention_and_widening_matmuls, width)
    return _keep_self_attention


@dataclass(frozen=True)
class Kept:
    """How many blocks keep what for backward: the first `matmuls` keep their self-attention output and widening
    matmuls' outputs, the first `attention` (at least as many) their self-attention output, the rest only their
    input."""

    attention: int
    matmuls: int = 0


def policies(depth: int, *, enabled: bool, kept: Kept) -> list[Recompute]:
    """Per block: the first `kept.matmuls` recompute only elementwise work, up to `kept.attention` all but
    self-attention, the others all."""
    if not enabled:
        return [Recompute.NOTHING] * depth
    attention = max(0, min(depth, kept.attention))
    matmuls = max(0, min(attention, kept.matmuls))
    return ([Recompute.ELEMENTWISE] * matmuls + [Recompute.ALL_BUT_ATTENTION] * (attention - matmuls)
            + [Recompute.ALL] * (depth - attention))


# What one block's backward holds at its peak beyond the saved inputs, in [tokens, hidden] tensors (fitted on the
# H100 at 480x832 with 33, 61 and 93 frames).
BACKWARD_WORKING_SET = 34
# The share of the card a training step may plan for: the rest is for the allocator's fragmentation and for
# validation sampling. On an 80 GB card a 480x832x93 step then peaks under 60 GiB.
CARD_FRACTION = 0.75


def blocks_that_fit(dit: nn.Module, tokens: int, device: torch.device, *, streamed_bytes: int = 0) -> Kept:
    """How many blocks can keep their self-attention output, and then also their widening matmuls' outputs, for a
    micro-batch of `tokens` DiT tokens. Attention comes first: ~23 TFLOP of recomputation saved per 0.3 GiB at
    37k tokens, against ~10 TFLOP per 2.4 GiB for the matmuls, which only cards above 80 GB have room for.

    Memory model: what is allocated now (weights, adapters, quantized copies) + `streamed_bytes` (block weights
    that come and go: with offload the blocks' weights are not allocated now, but the running block's and the
    next one's are at the peak) + every block's saved input + one block's backward working set + per block that
    keeps its attention, its output and float32 log-sum-exp, + per block that keeps its matmuls, the qkv, w1 and
    w3 outputs. Off the GPU (tests, the demo) memory is not the limit: every block keeps its attention output, and
    the matmul outputs are recomputed as before.
    """
    depth = len(dit.blocks)
    if device.type != "cuda":
        return Kept(attention=depth)
    config = dit.config
    element = dit.x_embedder.proj.weight.element_size()
    width = config.hidden_size * element
    # A process capped by set_per_process_memory_fraction plans for its cap (bench --card-gib: a smaller card).
    index = device.index if device.index is not None else torch.cuda.current_device()
    card = torch.cuda.mem_get_info(index)[1] * torch.cuda.get_per_process_memory_fraction(index)
    budget = CARD_FRACTION * card
    room = (budget - torch.cuda.memory_allocated(device) - streamed_bytes
            - tokens * width * (depth + BACKWARD_WORKING_SET))
    per_attention = tokens * (width + 4 * config.num_heads)
    attention = int(max(0, min(depth, room // per_attention)))
    per_matmuls = tokens * (3 * config.hidden_size + 2 * dit.blocks[0].ffn.w1.out_features) * element
    matmuls = int(max(0, min(attention, (room - attention * per_attention) // per_matmuls)))
    return Kept(attention=attention, matmuls=matmuls)


def _when_grad(wrapped: Callable, plain: Callable) -> Callable:
    """`wrapped` while autograd records, `plain` otherwise."""

    def forward(*args: object) -> torch.Tensor:
        return wrapped(*args) if torch.is_grad_enabled() else plain(*args)

    return forward


def block_forward(forward: Callable, recompute: Recompute, *, compile: bool, width: int) -> Callable:
    """A block's forward wrapped for `recompute`, its compiled region included when `compile`; `width`: the
    block's hidden size."""
    if recompute in (Recompute.ALL_BUT_ATTENTION, Recompute.ELEMENTWISE):
        context_fn = functools.partial(create_selective_checkpoint_contexts, _policy_fn(recompute, width))
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
        block.forward = block_forward(type(block).forward.__get__(block), policy, compile=compile,
                                      width=block.attn.proj.out_features)
