"""Caption dropout (SimpleTuner's caption_dropout_probability): a sample now and then trains on the empty prompt,
so the adapter also learns the unconditional branch that classifier-free guidance subtracts.

The draw is a pure function of (seed, step, rank, micro-batch, sample), not of an RNG that advances: a resumed
run draws exactly what the uninterrupted one did, and the noise stream is left as it was without dropout.
"""

from __future__ import annotations

import random

import torch


def uniforms(seed: int, step: int, rank: int, micro: int, count: int) -> torch.Tensor:
    """`count` draws in [0, 1) for the samples of one micro-batch; a sample is dropped when its draw is below its
    probability."""
    rng = random.Random(f"caption-dropout:{seed}:{step}:{rank}:{micro}")
    return torch.tensor([rng.random() for _ in range(count)])


def drop_captions(batch: dict[str, torch.Tensor], draws: torch.Tensor, empty_states: torch.Tensor,
                  empty_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """The batch with the text states and mask of the dropped samples replaced by the empty prompt's
    (`empty_states` [1, 1, L, D] and `empty_mask` [1, L], on the batch's device)."""
    dropped = draws.to(batch["caption_dropout"].device) < batch["caption_dropout"]
    return {
        **batch,
        "text": torch.where(dropped[:, None, None, None], empty_states, batch["text"]),
        "text_mask": torch.where(dropped[:, None], empty_mask, batch["text_mask"]),
    }
