"""What the caching and sampling code calls: video <-> normalized latents, captions -> text states.

Latents seen by the DiT are the Wan VAE's, normalized per channel with the VAE config's `latents_mean`
and `latents_std`: z = (latent - mean) / std. A video of F = 4k+1 frames at HxW gives
[16, k+1, H/8, W/8] latents (the first frame is encoded alone, then each group of 4).
"""

from __future__ import annotations

import html
import re

import ftfy
import torch
from diffusers import AutoencoderKLWan
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

MAX_TEXT_TOKENS = 512


def _channel_stats(vae: AutoencoderKLWan, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=like.device, dtype=like.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=like.device, dtype=like.dtype).view(shape)
    return mean, std


def normalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _channel_stats(vae, latents)
    return (latents - mean) / std


def denormalize_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    mean, std = _channel_stats(vae, latents)
    return latents * std + mean


def check_video_shape(vae: AutoencoderKLWan, video: torch.Tensor) -> None:
    """Refuse a [B, 3, F, H, W] video the VAE cannot encode exactly, naming the size that is off."""
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video must be [B, 3, frames, height, width] in [-1, 1]; got shape {list(video.shape)}")
    frames, height, width = video.shape[2:]
    temporal, spatial = vae.config.scale_factor_temporal, vae.config.scale_factor_spatial
    if (frames - 1) % temporal:
        raise ValueError(f"video has {frames} frames; the VAE needs 1 + {temporal}k frames (e.g. 1, 5, ..., 93)")
    if height % spatial or width % spatial:
        raise ValueError(f"video is {height}x{width}; height and width must be multiples of {spatial}")


@torch.no_grad()
def encode_video_latents(
    vae: AutoencoderKLWan, video: torch.Tensor, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Normalized latents [B, 16, 1+(F-1)/4, H/8, W/8] of a video [B, 3, F, H, W] in [-1, 1].

    With a generator the posterior is sampled (as the official pipeline does for its conditioning frame);
    without one its mean is used, which makes cached latents deterministic.
    """
    check_video_shape(vae, video)
    posterior = vae.encode(video.to(vae.device, vae.dtype)).latent_dist
    latents = posterior.mode() if generator is None else posterior.sample(generator)
    return normalize_latents(vae, latents)


@torch.no_grad()
def decode_latents(vae: AutoencoderKLWan, latents: torch.Tensor) -> torch.Tensor:
    """Video [B, 3, F, H, W] in [-1, 1] (float32) from normalized latents."""
    latents = denormalize_latents(vae, latents.to(vae.device, vae.dtype))
    return vae.decode(latents).sample.float().clamp(-1, 1)


def clean_prompt(text: str) -> str:
    """The official pipeline's caption cleaning: fix mojibake, unescape HTML twice, collapse whitespace."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    text_encoder: UMT5EncoderModel,
    prompts: list[str],
    *,
    max_length: int = MAX_TEXT_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states [B, 1, max_length, d_model] and the int64 attention mask [B, max_length].

    Captions are padded to max_length (longer ones are cut) and the mask is kept: the DiT zeroes the padded
    states itself (text_tokens_zero_pad), and a cache can store only the first mask.sum() rows.
    """
    tokens = tokenizer(
        [clean_prompt(p) for p in prompts],
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = text_encoder.device
    mask = tokens.attention_mask.to(device)
    states = text_encoder(input_ids=tokens.input_ids.to(device), attention_mask=mask).last_hidden_state
    return states.unsqueeze(1), mask
