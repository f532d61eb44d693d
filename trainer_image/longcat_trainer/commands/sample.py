"""`longcat-i2v sample`: preview a LoRA, one image-to-video MP4 from a start frame and a prompt."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import get_args

import torch
from pydantic import ValidationError

from longcat_job.api import SAMPLERS, GuidanceMethod, ValidationSpec

from .. import media
from ..data.video import BadSampleError
from ..denoise import DEFAULT_FPS
from ..metrics import RateLog
from ..preview import Preview, generate

log = logging.getLogger(__name__)



def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="longcat-i2v sample", description="Preview a LoRA: one image-to-video MP4.")
    parser.add_argument("--model", required=True, help="checkpoint: local folder, hf://org/repo or s3://bucket/prefix")
    parser.add_argument("--lora", type=Path, help="lora/ folder (or its pytorch_lora_weights.safetensors)")
    parser.add_argument("--lora-strength", type=float, default=1.0, help="scale of the LoRA's change (default 1)")
    parser.add_argument("--image", type=Path, required=True, help="start frame (PNG or JPEG)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--out", type=Path, required=True, help="MP4 to write; a contact sheet goes next to it")
    parser.add_argument("--frames", type=int, default=93)
    parser.add_argument("--resolution", default="480x832", help="HEIGHTxWIDTH")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--guidance-method", choices=get_args(GuidanceMethod), default="cfg")
    parser.add_argument("--sampler", choices=SAMPLERS, default="standard",
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
    from ..model.sources import resolve_model_source  # noqa: PLC0415 - heavy imports only when sampling

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    spec = settings_from_args(args)
    if not args.image.is_file():
        raise SystemExit(f"--image: {args.image} is not a file")
    preview = Preview(resolve_model_source(args.model), args.image, str(args.image), args.prompt, spec,
                      lora=args.lora, lora_strength=args.lora_strength)
    rate = RateLog("sample", 1, " steps")

    def progress(done: int, total: int) -> None:
        rate.total = total
        rate.update(done)

    try:
        frames = generate(preview, torch.device(args.device), progress)
    except BadSampleError as exc:
        raise SystemExit(f"--image: {exc}") from None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(media.mp4_bytes(frames, args.fps))
    sheet = args.out.with_suffix(".png")
    sheet.write_bytes(media.contact_sheet_png(frames, caption=args.prompt, step=None))
    log.info("wrote %s (%d frames, %s, %d fps) and %s", args.out, frames.shape[0], spec.resolution, args.fps, sheet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
