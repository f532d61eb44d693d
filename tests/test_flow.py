"""Flow matching against the official sampler's conventions (diffusers' FlowMatchEulerDiscreteScheduler)."""

from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from longcat_trainer import flow


def test_shift_matches_the_scheduler() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0)
    unshifted = torch.linspace(1000, 1, 1000) / 1000  # the training timesteps 1000..1 as sigmas
    assert torch.allclose(scheduler.sigmas, flow.shift_sigmas(unshifted, 12.0), atol=1e-6)
    sigmas = flow.sample_sigmas(10_000, 12.0, torch.Generator().manual_seed(0))
    assert 0 <= sigmas.min() and sigmas.max() < 1
    assert sigmas.median() > 0.9  # shift 12 puts most of the mass near pure noise


def test_target_sign_follows_the_official_euler_step() -> None:
    """The pipeline steps with -DiT(x); with DiT = our target x0 - eps the step lands exactly on the next x_t."""
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(1, 16, 3, 4, 6, generator=g), torch.randn(1, 16, 3, 4, 6, generator=g)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=12.0)
    scheduler.set_timesteps(4, sigmas=torch.linspace(1, 0.001, 4).tolist())
    sigma, sigma_next = scheduler.sigmas[1].item(), scheduler.sigmas[2].item()
    start = torch.zeros(1, 16, 1, 4, 6)
    clips = torch.cat([start, x0[:, :, 1:]], dim=2)
    batch = flow.make_flow_batch(clips, start, torch.tensor([sigma]), eps)
    assert torch.allclose(batch.timestep[0, 1:], torch.tensor(1000 * sigma))
    scheduler._step_index = 1
    stepped = scheduler.step(-batch.target, scheduler.timesteps[1], batch.noisy[:, :, 1:], return_dict=False)[0]
    expected = (1 - sigma_next) * x0[:, :, 1:] + sigma_next * eps[:, :, 1:]
    assert torch.allclose(stepped, expected, atol=1e-5)


def test_start_frame_latent_is_never_noised() -> None:
    g = torch.Generator().manual_seed(2)
    clips, start = torch.randn(3, 16, 4, 4, 6, generator=g), torch.randn(3, 16, 1, 4, 6, generator=g)
    for sigma in (torch.tensor([0.0, 0.5, 1.0]), torch.rand(3, generator=g)):
        batch = flow.make_flow_batch(clips, start, sigma, torch.randn(clips.shape, generator=g))
        assert torch.equal(batch.noisy[:, :, :1], start)
        assert torch.equal(batch.timestep[:, 0], torch.zeros(3))
    assert torch.equal(flow.make_flow_batch(clips, start, torch.ones(3), clips).noisy[:, :, 1:], clips[:, :, 1:])


def test_loss_ignores_the_conditioning_frame() -> None:
    g = torch.Generator().manual_seed(3)
    clips, start = torch.randn(2, 16, 3, 4, 6, generator=g), torch.randn(2, 16, 1, 4, 6, generator=g)
    batch = flow.make_flow_batch(clips, start, torch.rand(2, generator=g), torch.randn(clips.shape, generator=g))
    prediction = torch.randn(clips.shape, generator=g)
    changed = prediction.clone()
    changed[:, :, 0] += 100
    assert flow.flow_loss(prediction, batch) == flow.flow_loss(changed, batch)
    perfect = torch.cat([prediction[:, :, :1], batch.target], dim=2)
    assert flow.flow_loss(perfect, batch) == 0
