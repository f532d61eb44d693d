"""Ulysses context parallelism for the DiT: one sample's video tokens split over the N ranks of a group.

As in the official inference code (`longcat_video/context_parallel/`), the sequence is sharded outside
attention, and self-attention runs on head shards of the whole sequence, reached by an all-to-all (sequence
shards -> head shards) before it and the reverse all-to-all after it. The official code shards each frame's
h x w grid (`cp_split_hw`); here the shards are whole latent frames instead (rank r holds frames
[r*T/N, (r+1)*T/N)), which in the (t, h, w) token order are contiguous, so that no tokens are reordered and:

- per-frame adaLN modulation needs only the rank's slice of the timestep embedding;
- the conditioning frame (frame 0) is the leading tokens of rank 0 alone, for cross-attention, which it skips;
- inside attention every rank sees the whole sequence (its heads only), so the image-to-video attention rule
  and the 3-D RoPE positions are those of the unsplit model, applied after the all-to-all.

Cross-attention to the caption runs on the local shard against the whole caption (every rank of a group has
the same text). The final layer's small output [B, N/ranks, p*C] is gathered, so the model returns the same
full tensor on every rank: the loss and the sampler need no change. The gather's backward all-reduces, so each
rank's parameters get N times their share of the gradient; averaging over the whole world (DDP/FSDP) then
gives sum-over-shards / data-parallel groups, the unsplit model's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from longcat_job.failures import InvalidConfigError

from ..distributed import World


@dataclass(frozen=True)
class ContextParallel:
    """This rank's place in its context-parallel group."""

    group: dist.ProcessGroup
    size: int
    rank: int  # within the group

    def local_frames(self, frames: int) -> slice:
        if frames % self.size:
            raise ValueError(
                f"{frames} latent frames do not split over spec.training.contextParallel={self.size} ranks: "
                "choose frames with ((frames - 1) / 4 + 1) divisible by it"
            )
        per_rank = frames // self.size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def local_prefix(self, prefix_tokens: int, local_tokens: int) -> int:
        """How many of the sequence's leading `prefix_tokens` lie in this rank's shard of `local_tokens`."""
        return max(0, min(local_tokens, prefix_tokens - self.rank * local_tokens))

    def sequence_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, K, H, D] (this rank's n tokens, all heads) -> [B, n*size, K, H/size, D] (all tokens, its heads)."""
        B, n, K, H, D = x.shape
        chunks = x.reshape(B, n, K, self.size, H // self.size, D).permute(3, 0, 1, 2, 4, 5).contiguous()
        received = self._all_to_all(chunks)  # [source rank, B, n, K, H/size, D]: source rank = token block
        return received.permute(1, 0, 2, 3, 4, 5).reshape(B, n * self.size, K, H // self.size, D)

    def heads_to_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[B, H/size, N, D] (all tokens, its heads) -> [B, N/size, H*D] (its tokens, all heads)."""
        B, h, N, D = x.shape
        n = N // self.size
        chunks = x.reshape(B, h, self.size, n, D).permute(2, 0, 3, 1, 4).contiguous()
        received = self._all_to_all(chunks)  # [source rank, B, n, H/size, D]: source rank = head block
        return received.permute(1, 2, 0, 3, 4).reshape(B, n, self.size * h * D)

    def _all_to_all(self, chunks: torch.Tensor) -> torch.Tensor:
        """Chunk i of dim 0 goes to rank i; the result's chunk i came from rank i. Differentiable and traceable
        by torch.compile (a functional collective)."""
        out = funcol.all_to_all_single_autograd(chunks.flatten(1), None, None, self.group)
        return funcol.wait_tensor(out).view_as(chunks)

    def gather_sequence(self, x: torch.Tensor) -> torch.Tensor:
        """[B, n, C] shards -> [B, n*size, C] on every rank; backward all-reduces and keeps this rank's part."""
        return _GatherSequence.apply(x, self)


class _GatherSequence(torch.autograd.Function):
    # all_gather's usual backward is a reduce-scatter, which gloo lacks; an all-reduce of the small output
    # gradient works on every backend and costs little next to the attention all-to-alls.
    @staticmethod
    def forward(ctx, x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
        ctx.cp = cp
        parts = [torch.empty_like(x) for _ in range(cp.size)]
        dist.all_gather(parts, x.contiguous(), group=cp.group)
        return torch.cat(parts, dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        cp: ContextParallel = ctx.cp
        grad = grad.contiguous()
        dist.all_reduce(grad, group=cp.group)
        return grad.chunk(cp.size, dim=1)[cp.rank].contiguous(), None


def for_world(world: World) -> ContextParallel | None:
    """The world's context-parallel group as the model sees it; None without one."""
    if world.context_group is None:
        return None
    return ContextParallel(world.context_group, world.context_parallel, world.context_rank)


def enable(dit: torch.nn.Module, cp: ContextParallel | None) -> None:
    """Run `dit` split over `cp`'s group from now on (None: unsplit). Sets the model's and each attention's view."""
    if cp is not None and dit.config.num_heads % cp.size:
        raise InvalidConfigError(
            f"spec.training.contextParallel={cp.size} must divide the model's {dit.config.num_heads} attention "
            "heads (Ulysses splits the heads over the group): use a divisor of it"
        )
    dit.context_parallel = cp
    for block in dit.blocks:
        block.attn.context_parallel = cp
