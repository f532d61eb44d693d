"""One image-to-video clip from a start frame and a prompt, optionally with a trained LoRA at some strength:
the core of `longcat-i2v sample` and of the UI server's preview worker (longcat_ui/preview_queue.py)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from longcat_job.api import LoraSpec, ValidationSpec

from . import lora, official_lora
from .denoise import (
    initial_noise,
    latent_frames,
    load_start_frame,
    report_first_step,
    sample_latents,
    settings_for,
    to_uint8_frames,
)
from .model import encode, recompute

log = logging.getLogger(__name__)


def load_lora_file(dit: torch.nn.Module, path: Path, strength: float = 1.0) -> None:
    """Add and load a LoRA exported by training (pytorch_lora_weights.safetensors + adapter_config.json);
    `strength` scales its change of every weight (lora_B carries the scale: B·A is linear in B)."""
    from peft import LoraConfig  # noqa: PLC0415 - only previews read adapter configs

    weights = path / lora.PEFT_WEIGHTS if path.is_dir() else path
    config_file = weights.parent / lora.PEFT_CONFIG
    if not weights.is_file():
        raise FileNotFoundError(f"--lora {path}: no {weights.name} there; pass the lora/ folder of a finished job")
    if not config_file.is_file():
        raise FileNotFoundError(f"--lora {path}: {config_file} is missing; it is written next to {weights.name}")
    config = LoraConfig.from_pretrained(str(weights.parent))
    targets = sorted({m.rsplit(".", 1)[-1] for m in config.target_modules})
    lora.add_lora(dit, LoraSpec(rank=config.r, alpha=config.lora_alpha, dropout=0.0, targets=targets))
    state = lora.read_peft_weights(weights.read_bytes())
    lora.load_lora_state(dit, {k: v * strength if ".lora_B." in k else v for k, v in state.items()})


@dataclass(frozen=True)
class Preview:
    model_root: Path
    image: Path | BinaryIO  # PNG or JPEG; scaled to cover the resolution and centre-cropped
    image_name: str  # for messages
    prompt: str
    spec: ValidationSpec  # resolution, frames, steps, guidance, sampler, negative prompt, seed
    lora: Path | None = None
    lora_strength: float = 1.0


def generate(preview: Preview, device: torch.device, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """uint8 frames [F, H, W, 3]; `on_step(done, total)` after each denoising step. Raises BadSampleError for
    a start frame that cannot be used."""
    from .model.loading import load_stack  # noqa: PLC0415 - heavy imports only when sampling

    spec = preview.spec
    height, width = (int(v) for v in spec.resolution.split("x"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    start = load_start_frame(preview.image, preview.image_name, height, width)
    stack = load_stack(preview.model_root, dtype=dtype, device=device)
    if preview.lora is not None:
        load_lora_file(stack.dit, preview.lora, preview.lora_strength)
    stack.dit.eval()
    settings = settings_for(spec, stack.scheduler.config.shift)
    with torch.no_grad():
        prompt = encode.encode_prompts(stack.tokenizer, stack.text_encoder, [preview.prompt])
        negative = (encode.encode_prompts(stack.tokenizer, stack.text_encoder, [spec.negative_prompt])
                    if settings.guidance > 1 else None)
        start_latents = encode.encode_video_latents(stack.vae, start.to(device)).float()
        _, channels, _, h, w = start_latents.shape
        noise = initial_noise((1, channels, latent_frames(spec.frames) - 1, h, w), spec.seed)
        distillation = official_lora.load(preview.model_root, device, dtype) if settings.sampler == "distilled" else {}
        if device.type == "cuda":  # as in training: one compiled graph serves every block (its first step compiles)
            recompute.apply(stack.dit.blocks, [recompute.Recompute.NOTHING] * len(stack.dit.blocks), compile=True)
        total = settings.steps
        with official_lora.active(stack.dit, distillation):
            latents = sample_latents(stack.dit, start_latents, prompt, negative, noise, settings,
                                     on_step=report_first_step("sample", lambda done: on_step and on_step(done, total)))
        return to_uint8_frames(encode.decode_latents(stack.vae, latents))
