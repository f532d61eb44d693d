"""`longcat-i2v sample`: preview a LoRA, one image-to-video MP4 from a start frame and a prompt."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from pydantic import ValidationError

from longcat_job.api import LoraSpec, ValidationSpec

from .. import lora, media, official_lora
from ..data.video import BadSampleError
from ..denoise import (
    DEFAULT_FPS,
    initial_noise,
    latent_frames,
    load_start_frame,
    report_first_step,
    sample_latents,
    settings_for,
    to_uint8_frames,
)
from ..metrics import RateLog
from ..model import encode, recompute

log = logging.getLogger(__name__)



def load_lora_file(dit: torch.nn.Module, path: Path) -> None:
    """Add and load a LoRA exported by training (pytorch_lora_weights.safetensors + adapter_config.json)."""
    from peft import LoraConfig  # noqa: PLC0415 - only the preview command reads adapter configs

    weights = path / lora.PEFT_WEIGHTS if path.is_dir() else path
    config_file = weights.parent / lora.PEFT_CONFIG
    if not weights.is_file():
        raise FileNotFoundError(f"--lora {path}: no {weights.name} there; pass the lora/ folder of a finished job")
    if not config_file.is_file():
        raise FileNotFoundError(f"--lora {path}: {config_file} is missing; it is written next to {weights.name}")
    config = LoraConfig.from_pretrained(str(weights.parent))
    targets = sorted({m.rsplit(".", 1)[-1] for m in config.target_modules})
    lora.add_lora(dit, LoraSpec(rank=config.r, alpha=config.lora_alpha, dropout=0.0, targets=targets))
    lora.load_lora_state(dit, lora.read_peft_weights(weights.read_bytes()))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="longcat-i2v sample", description="Preview a LoRA: one image-to-video MP4.")
    parser.add_argument("--model", required=True, help="checkpoint: local folder, hf://org/repo or s3://bucket/prefix")
    parser.add_argument("--lora", type=Path, help="lora/ folder (or its pytorch_lora_weights.safetensors)")
    parser.add_argument("--image", type=Path, required=True, help="start frame (PNG or JPEG)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--out", type=Path, required=True, help="MP4 to write; a contact sheet goes next to it")
    parser.add_argument("--frames", type=int, default=93)
    parser.add_argument("--resolution", default="480x832", help="HEIGHTxWIDTH")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--guidance-method", choices=["cfg", "optimized"], default="cfg")
    parser.add_argument("--sampler", choices=["standard", "distilled"], default="standard",
                        help="distilled: the checkpoint's cfg-step LoRA, 16 steps, no guidance (ignores --steps, --guidance)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--fps", type=int, default=DEFAULT_FPS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


FLAGS = {"resolution": "--resolution", "frames": "--frames", "num_inference_steps": "--steps",
         "guidance": "--guidance", "sampler": "--sampler", "seed": "--seed", "negative_prompt": "--negative-prompt"}


def settings_from_args(args: argparse.Namespace) -> ValidationSpec:
    """The job API's validation rules, applied to the flags (one definition of what is allowed)."""
    try:
        return ValidationSpec(resolution=args.resolution, frames=args.frames, num_inference_steps=args.steps,
                              guidance=args.guidance, guidance_method=args.guidance_method, sampler=args.sampler,
                              negative_prompt=args.negative_prompt, seed=args.seed)
    except ValidationError as exc:
        problems = [f"{FLAGS.get(str(e['loc'][0]), e['loc'][0])}: {e['msg']}" for e in exc.errors()]
        raise SystemExit("longcat-i2v sample: " + "; ".join(problems)) from None


def main(argv: Sequence[str] | None = None) -> int:
    from ..model.loading import load_stack  # noqa: PLC0415 - heavy imports only when sampling
    from ..model.sources import resolve_model_source  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    spec = settings_from_args(args)
    height, width = (int(v) for v in spec.resolution.split("x"))
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        start = load_start_frame(args.image, str(args.image), height, width)
    except BadSampleError as exc:
        raise SystemExit(f"--image: {exc}") from None
    model_root = resolve_model_source(args.model)
    stack = load_stack(model_root, dtype=dtype, device=device)
    if args.lora is not None:
        load_lora_file(stack.dit, args.lora)
    stack.dit.eval()
    settings = settings_for(spec, stack.scheduler.config.shift)
    prompt = encode.encode_prompts(stack.tokenizer, stack.text_encoder, [args.prompt])
    negative = encode.encode_prompts(stack.tokenizer, stack.text_encoder, [spec.negative_prompt]) if settings.guidance > 1 else None
    start_latents = encode.encode_video_latents(stack.vae, start.to(device)).float()
    _, channels, _, h, w = start_latents.shape
    noise = initial_noise((1, channels, latent_frames(spec.frames) - 1, h, w), spec.seed)
    distillation = official_lora.load(model_root, device, dtype) if settings.sampler == "distilled" else {}
    if device.type == "cuda":  # as in training: one compiled graph serves every block (its first step compiles)
        recompute.apply(stack.dit.blocks, [recompute.Recompute.NOTHING] * len(stack.dit.blocks), compile=True)
    rate = RateLog("sample", settings.steps, " steps")
    with official_lora.active(stack.dit, distillation):
        latents = sample_latents(stack.dit, start_latents, prompt, negative, noise, settings,
                                 on_step=report_first_step("sample", rate.update))
    frames = to_uint8_frames(encode.decode_latents(stack.vae, latents))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(media.mp4_bytes(frames, args.fps))
    sheet = args.out.with_suffix(".png")
    sheet.write_bytes(media.contact_sheet_png(frames, caption=args.prompt, step=None))
    log.info("wrote %s (%d frames, %dx%d, %d fps) and %s", args.out, frames.shape[0], width, height, args.fps, sheet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
