"""Flow matching for image-to-video, as the official LongCat-Video sampler expects the DiT to behave.

Noising: x_t = (1 - sigma) * x0 + sigma * eps, so dx/dsigma = eps - x0. The official pipeline calls the DiT
with timestep 1000 * sigma, negates its output and hands it to the Euler step
x_next = x + (sigma_next - sigma) * model_output; that step follows the flow only if -DiT = eps - x0, so the
DiT's training target is x0 - eps (checked in tests/test_flow.py against diffusers' Euler scheduler).

Image-to-video: latent frame 0 is the clean start-frame latent with timestep 0 (the DiT is called with
num_cond_latents=1) and is left out of the loss; only frames 1.. are noised and learned.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
NUM_COND_LATENTS = 1


def shift_sigmas(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """sigma' = s*sigma / (1 + (s - 1)*sigma): the flow shift of the official scheduler (s = 12 moves mass to noise)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    """One noise level per sample: uniform in [0, 1), then shifted."""
    return shift_sigmas(torch.rand(batch, generator=generator), shift)


def slot_noise(
    seed: int, step: int, slot: int, shape: torch.Size, shift: float, *, pin_memory: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigmas [B] and noise (of `shape`, on the CPU) of one micro-batch of an optimizer step.

    slot numbers the step's micro-batches over the world: micro_batch * data_parallel_size + data_parallel_rank,
    the order in which the data-parallel groups take batches from the epoch. Drawn from (seed, step, slot)
    alone, so the ranks of a context-parallel group draw the same noise, a resumed run draws what it would
    have, and one process accumulating G micro-batches draws what G groups draw.
    """
    digest = hashlib.blake2b(f"{seed}:{step}:{slot}".encode(), digest_size=8).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
    sigma = sample_sigmas(shape[0], shift, generator)
    return sigma, torch.randn(shape, generator=generator, pin_memory=pin_memory)


@dataclass
class FlowBatch:
    noisy: torch.Tensor  # [B, C, T, H, W]; frame 0 is the clean start-frame latent
    timestep: torch.Tensor  # [B, T]; 0 on frame 0
    target: torch.Tensor  # [B, C, T-1, H, W]: x0 - eps on frames 1..


def make_flow_batch(
    clip_latents: torch.Tensor, start_latents: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor
) -> FlowBatch:
    """clip_latents [B, C, T, H, W] (frame 0 is replaced), start_latents [B, C, 1, H, W], sigma [B], noise as clips."""
    x0 = clip_latents[:, :, NUM_COND_LATENTS:]
    eps = noise[:, :, NUM_COND_LATENTS:]
    s = sigma.view(-1, 1, 1, 1, 1).to(x0.dtype)
    noisy = torch.cat([start_latents.to(x0.dtype), (1 - s) * x0 + s * eps], dim=2)
    timestep = (NUM_TRAIN_TIMESTEPS * sigma)[:, None].repeat(1, clip_latents.shape[2])
    timestep[:, :NUM_COND_LATENTS] = 0
    return FlowBatch(noisy=noisy, timestep=timestep, target=x0 - eps)


def flow_loss(prediction: torch.Tensor, batch: FlowBatch) -> torch.Tensor:
    """Mean squared error on frames 1.. only (the conditioning frame's output is not trained)."""
    return torch.nn.functional.mse_loss(prediction[:, :, NUM_COND_LATENTS:].float(), batch.target.float())


def training_loss(
    model: torch.nn.Module, clip: torch.Tensor, start: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
    sigma: torch.Tensor, noise: torch.Tensor, dtype: torch.dtype,
) -> torch.Tensor:
    """The loss of one micro-batch: frames 1.. noised to sigma, frame 0 the clean start frame at t = 0.

    bench/train_step_bench.py times exactly this (plus backward and the optimizer step) at full size.
    """
    fb = make_flow_batch(clip, start, sigma, noise)
    prediction = model(fb.noisy.to(dtype), fb.timestep, text.to(dtype), text_mask,
                       num_cond_latents=NUM_COND_LATENTS)
    return flow_loss(prediction, fb)
