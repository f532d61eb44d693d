"""Image-to-video sampling with the DiT (and a LoRA, when one is loaded): the denoising loop.

The official LongCat-Video I2V sampler, rewritten for this project:
- sigmas: linspace(1, 0.001, steps), flow-shifted with the scheduler's `shift` (flow.shift_sigmas), then 0;
  the DiT sees timestep 1000 * sigma on the noisy frames and 0 on the conditioning frame.
- the start frame's latent is frame 0 and is never written: the Euler step x += (sigma_next - sigma) * -v
  (the DiT's output negated, as the official scheduler expects) touches frames 1.. only.
- guidance > 1: the negative caption (empty unless given) and the positive run as one batch of two;
  "cfg" mixes them as u + g (c - u); "optimized" is the official pipeline's optimized scale (CFG-Zero*),
  u s + g (c - u s) with s = <c, u> / |u|^2 per sample. The job API's default is "cfg"; the official
  pipeline always uses "optimized". Here s is measured over the frames that are denoised (the official
  no-cache I2V path also counts the ignored frame-0 output).
- sampler "distilled": the official distillation schedule (`get_timesteps_sigmas(use_distill=True)`): the 50
  distillation timesteps 20, 40, .., 1000 of the 1000 training ones, DISTILLED_STEPS of them taken evenly from
  the top, flow-shifted like the standard ones; no guidance. It is meant for the checkpoint's cfg-step LoRA
  (official_lora.py), which the caller activates.
- the conditioning frame's keys and values are computed once (`conditioning_cache`) and reused by every
  step, so each step runs only the noisy frames' tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from longcat_job.api import (  # noqa: F401  (the callers of the sampler import latent_frames from here)
    GuidanceMethod,
    Sampler,
    ValidationSpec,
    latent_frames,
)
from longcat_job.buckets import Bucket

from . import flow
from .data.video import load_image, resize_crop
from .model.dit import LongCatVideoTransformer3DModel

log = logging.getLogger(__name__)

SIGMA_MAX, SIGMA_MIN = 1.0, 0.001  # the official schedule's end points (before the shift)
DISTILL_TIMESTEPS = 50  # the official pipeline's num_distill_sample_steps
DISTILLED_STEPS = 16  # the official I2V demo's steps with the cfg-step LoRA
DEFAULT_FPS = 16
TextStates = tuple[torch.Tensor, torch.Tensor]  # states [1, 1, M, D], mask [1, M]


@dataclass(frozen=True)
class SamplerSettings:
    steps: int = 40
    guidance: float = 4.0
    guidance_method: GuidanceMethod = "cfg"
    sampler: Sampler = "standard"
    shift: float = 12.0  # the scheduler's config value; the callers read it from scheduler/
    # Speed options; off = the naive sampler (two forward passes a step, conditioning frame recomputed).
    batch_guidance: bool = True
    reuse_cond_kv: bool = True


def settings_for(spec: ValidationSpec, shift: float) -> SamplerSettings:
    """The sampler a job's (or the sample command's) validation settings ask for."""
    if spec.sampler == "distilled":
        return SamplerSettings(steps=DISTILLED_STEPS, guidance=1.0, sampler="distilled", shift=shift)
    return SamplerSettings(steps=spec.num_inference_steps, guidance=spec.guidance,
                           guidance_method=spec.guidance_method, shift=shift)


def unshifted_sigmas(steps: int, sampler: Sampler) -> torch.Tensor:
    if sampler == "standard":
        return torch.linspace(SIGMA_MAX, SIGMA_MIN, steps, dtype=torch.float64)
    stride = flow.NUM_TRAIN_TIMESTEPS // DISTILL_TIMESTEPS
    descending = torch.arange(DISTILL_TIMESTEPS, 0, -1, dtype=torch.float64) * stride
    picked = torch.floor(torch.arange(steps, dtype=torch.float64) * DISTILL_TIMESTEPS / steps).long()
    return descending[picked] / flow.NUM_TRAIN_TIMESTEPS


def sigma_schedule(steps: int, shift: float, sampler: Sampler = "standard") -> torch.Tensor:
    """steps + 1 float32 sigmas, from shifted 1.0 down to 0 (the terminal value)."""
    sigmas = flow.shift_sigmas(unshifted_sigmas(steps, sampler), shift)
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)]).float()


def report_first_step(what: str, then: Callable[[int], None] = lambda step: None) -> Callable[[int], None]:
    """An on_step that logs how long the first step took (on CUDA it compiles the blocks' graph), then calls `then`."""
    started = time.monotonic()

    def on_step(step: int) -> None:
        if step == 1:
            log.info("%s: first denoising step %.1fs (includes compiling on CUDA)", what, time.monotonic() - started)
        then(step)

    return on_step


def initial_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """Noise for frames 1.. drawn on the CPU from `seed`, so a seed gives the same video on any device."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, method: GuidanceMethod) -> torch.Tensor:
    if method == "cfg":
        return uncond + scale * (cond - uncond)
    dims = tuple(range(1, cond.ndim))
    s = (cond * uncond).sum(dims, keepdim=True) / ((uncond * uncond).sum(dims, keepdim=True) + 1e-8)
    return uncond * s + scale * (cond - uncond * s)


@torch.no_grad()
def sample_latents(
    dit: LongCatVideoTransformer3DModel,
    start_latents: torch.Tensor,
    prompt: TextStates,
    negative: TextStates | None,
    noise: torch.Tensor,
    settings: SamplerSettings,
    on_step: Callable[[int], None] = lambda step: None,
) -> torch.Tensor:
    """Latents [1, C, 1 + T', h, w] (float32): start_latents [1, C, 1, h, w] followed by denoised noise [1, C, T', h, w].

    The returned frame 0 is `start_latents` itself, bit for bit. `negative` is needed when guidance > 1.
    """
    guided = settings.guidance > 1
    if guided and negative is None:
        raise ValueError("guidance > 1 needs the negative prompt's text states (the empty caption by default)")
    device, dtype = start_latents.device, dit.x_embedder.proj.weight.dtype
    start = start_latents.float()
    x = noise.to(device, torch.float32)
    sigmas = sigma_schedule(settings.steps, settings.shift, settings.sampler).tolist()
    cache = dit.conditioning_cache(start.to(dtype)) if settings.reuse_cond_kv else None
    texts = [negative, prompt] if guided else [prompt]
    if settings.batch_guidance:
        texts = [(torch.cat([t[0] for t in texts]), torch.cat([t[1] for t in texts]))]

    def velocity(latents: torch.Tensor, text: TextStates, sigma: float) -> torch.Tensor:
        batch = text[0].shape[0]
        if cache is None:  # the whole clip, frame 0 at timestep 0; its output is dropped
            inputs = torch.cat([start, latents], dim=2).to(dtype).expand(batch, -1, -1, -1, -1)
            timestep = torch.full((batch, inputs.shape[2]), 1000 * sigma, device=device)
            timestep[:, : flow.NUM_COND_LATENTS] = 0
            out = dit(inputs, timestep, text[0].to(device, dtype), text[1].to(device), num_cond_latents=flow.NUM_COND_LATENTS)
            return out[:, :, flow.NUM_COND_LATENTS :]
        inputs = latents.to(dtype).expand(batch, -1, -1, -1, -1)
        timestep = torch.full((batch, inputs.shape[2]), 1000 * sigma, device=device)
        return dit(inputs, timestep, text[0].to(device, dtype), text[1].to(device), cond_cache=cache)

    for i in range(settings.steps):
        v = torch.cat([velocity(x, text, sigmas[i]) for text in texts])
        if guided:
            v = guide(v[:1], v[1:], settings.guidance, settings.guidance_method)
        x = x + (sigmas[i + 1] - sigmas[i]) * -v
        on_step(i + 1)
    return torch.cat([start_latents, x.to(start_latents.dtype)], dim=2)


def load_start_frame(source: Path | object, name: str, height: int, width: int) -> torch.Tensor:
    """A start frame (path or binary file) as [1, 3, 1, height, width] in [-1, 1]: scaled to cover, center-cropped."""
    image = load_image(source, name)  # type: ignore[arg-type]  # PIL opens paths and file objects alike
    return resize_crop(image, Bucket(height, width)).permute(1, 0, 2, 3)[None]


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, F, H, W] in [-1, 1] -> uint8 [F, H, W, 3]."""
    return ((video[0].permute(1, 2, 3, 0).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
