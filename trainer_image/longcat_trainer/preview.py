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


def trained_lora(path: Path, strength: float, device: torch.device, dtype: torch.dtype) -> official_lora.OfficialLora:
    """A LoRA exported by training (pytorch_lora_weights.safetensors + adapter_config.json) as factors to hook on
    while sampling; `strength` scales its change of every weight (B·A is linear in B). Hooks, not peft layers:
    the loaded model is not changed, so the next preview starts from the base as it was loaded."""
    from peft import LoraConfig  # noqa: PLC0415 - only previews read adapter configs

    weights = path / lora.PEFT_WEIGHTS if path.is_dir() else path
    config_file = weights.parent / lora.PEFT_CONFIG
    if not weights.is_file():
        raise FileNotFoundError(f"--lora {path}: no {weights.name} there; pass the lora/ folder of a finished job")
    if not config_file.is_file():
        raise FileNotFoundError(f"--lora {path}: {config_file} is missing; it is written next to {weights.name}")
    config = LoraConfig.from_pretrained(str(weights.parent))
    spec = LoraSpec(rank=config.r, alpha=config.lora_alpha, dropout=0.0,
                    targets=sorted({m.rsplit(".", 1)[-1] for m in config.target_modules}))
    state = lora.official_state(lora.read_peft_weights(weights.read_bytes()), spec)
    return official_lora.moved(official_lora.parse(state, multiplier=strength), device, dtype)


@dataclass(frozen=True)
class Preview:
    model_root: Path
    image: Path | BinaryIO  # PNG or JPEG; scaled to cover the resolution and centre-cropped
    image_name: str  # for messages
    prompt: str
    spec: ValidationSpec  # resolution, frames, steps, guidance, sampler, negative prompt, seed
    lora: Path | None = None
    lora_strength: float = 1.0


class PreviewModel:
    """The checkpoint loaded once for many previews (the UI server's worker keeps one): each preview's LoRA, and
    the cfg-step LoRA of the distilled sampler, are hooked on only while it samples."""

    def __init__(self, model_root: Path, device: torch.device) -> None:
        from .model.loading import load_stack  # noqa: PLC0415 - heavy imports only when sampling

        self.model_root, self.device = model_root, device
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.stack = load_stack(model_root, dtype=self.dtype, device=device)
        self.stack.dit.eval()
        if device.type == "cuda":  # as in training: one compiled graph serves every block (a first step compiles)
            recompute.apply(self.stack.dit.blocks, [recompute.Recompute.NOTHING] * len(self.stack.dit.blocks),
                            compile=True)
        self._distillation: official_lora.OfficialLora | None = None

    def distillation(self) -> official_lora.OfficialLora:
        if self._distillation is None:
            self._distillation = official_lora.load(self.model_root, self.device, self.dtype)
        return self._distillation

    def generate(self, preview: Preview, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
        """uint8 frames [F, H, W, 3]; `on_step(done, total)` after each denoising step. Raises BadSampleError for
        a start frame that cannot be used."""
        if preview.model_root != self.model_root:
            raise ValueError(f"this model is {self.model_root}, the preview asks for {preview.model_root}")
        spec, stack = preview.spec, self.stack
        height, width = (int(v) for v in spec.resolution.split("x"))
        start = load_start_frame(preview.image, preview.image_name, height, width)
        trained = ({} if preview.lora is None
                   else trained_lora(preview.lora, preview.lora_strength, self.device, self.dtype))
        settings = settings_for(spec, stack.scheduler.config.shift)
        if self.device.type == "cuda":
            # Other hooks than the last preview's: dynamo would recompile on its own, but stop doing so after a
            # few; traced afresh, every preview runs compiled.
            torch._dynamo.reset()
        with torch.no_grad():
            prompt = encode.encode_prompts(stack.tokenizer, stack.text_encoder, [preview.prompt])
            negative = (encode.encode_prompts(stack.tokenizer, stack.text_encoder, [spec.negative_prompt])
                        if settings.guidance > 1 else None)
            start_latents = encode.encode_video_latents(stack.vae, start.to(self.device)).float()
            _, channels, _, h, w = start_latents.shape
            noise = initial_noise((1, channels, latent_frames(spec.frames) - 1, h, w), spec.seed)
            distillation = self.distillation() if settings.sampler == "distilled" else {}
            total = settings.steps
            with (official_lora.active(stack.dit, trained, source=str(preview.lora),
                                       fix="pick a LoRA trained on this checkpoint"),
                  official_lora.active(stack.dit, distillation)):
                latents = sample_latents(stack.dit, start_latents, prompt, negative, noise, settings,
                                         on_step=report_first_step("sample",
                                                                   lambda done: on_step and on_step(done, total)))
            return to_uint8_frames(encode.decode_latents(stack.vae, latents))


def generate(preview: Preview, device: torch.device, on_step: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """One preview with the checkpoint loaded for it alone (`longcat-i2v sample`)."""
    return PreviewModel(preview.model_root, device).generate(preview, on_step)
