"""The full-size LoRA training step of the trainer on one GPU: seconds, peak memory, FLOPs and MFU per shape.

Builds the released DiT configuration on the GPU with random bf16 weights (built on the meta device, no host
copy), adds the spec's LoRA (rank 8 on qkv, proj, q_linear, kv_linear by default), and times the trainer's own
step: `flow.training_loss` (frame 0 clean at t = 0, loss on frames 1..), backward, gradient clipping,
AdamW. Each configuration runs in the same process, so their ratio is measured on the same card:

    baseline   eager, SDPA's default kernel choice, every block checkpointed
    variants   the optimizations of --variants, each measured on its own (e.g. cudnn+compile+keep2)

Forward FLOPs are counted analytically from the model's shapes (printed with the formula); MFU is
3 x forward FLOPs / step seconds / peak (989e12: H100 SXM dense bf16), the usual convention that does not credit
the recomputation of checkpointed blocks.

    python bench/train_step_bench.py [--shapes 93,61,33] [--steps 5] [--variants cudnn,cudnn+compile+keep2]
    python bench/train_step_bench.py --tiny   # the same code path on the CPU at tiny size (for tests)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer_image")]

from longcat_operator.api import LoraSpec  # noqa: E402
from longcat_trainer import flow, lora  # noqa: E402
from longcat_trainer.model.dit import LongCatVideoTransformer3DModel  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
TEXT_TOKENS, TEXT_VALID = 512, 120
TINY = dict(hidden_size=192, depth=2, num_heads=4, caption_channels=64, adaln_tembed_dim=32,
            frequency_embedding_size=32, text_tokens_zero_pad=True)


@dataclass(frozen=True)
class Shape:
    height: int
    width: int
    frames: int

    def latent(self) -> tuple[int, int, int]:
        return (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8


def forward_flops(model: LongCatVideoTransformer3DModel, shape: Shape, text: int) -> tuple[float, str]:
    """Matrix and attention FLOPs of one forward pass (2 per multiply-add); norms and elementwise work left out."""
    t, h, w = shape.latent()
    n = t * (h // 2) * (w // 2)  # video tokens (2x2 patches)
    c = (h // 2) * (w // 2)  # conditioning tokens: latent frame 0
    block = model.blocks[0]
    d = block.attn.proj.in_features
    f = block.ffn.w1.out_features
    per_block = (
        2 * n * 4 * d * d  # qkv + proj
        + 4 * d * (c * c + (n - c) * n)  # self-attention: conditioning tokens among themselves, the rest to all
        + 2 * (n - c) * 2 * d * d + 2 * text * 2 * d * d  # cross q_linear + proj on noisy tokens, kv_linear on text
        + 4 * (n - c) * text * d  # cross-attention
        + 2 * n * 3 * d * f  # SwiGLU w1, w3, w2
    )
    formula = (f"depth x [2N*4d^2 + 4d(c^2+(N-c)N) + 2(N-c)*2d^2 + 2L*2d^2 + 4(N-c)Ld + 2N*3df] with N={n}, c={c}, "
               f"L={text}, d={d}, f={f}, depth={len(model.blocks)}")
    return len(model.blocks) * per_block, formula


def build_model(tiny: bool, device: torch.device, dtype: torch.dtype) -> LongCatVideoTransformer3DModel:
    config = TINY if tiny else {"text_tokens_zero_pad": True}
    with torch.device("meta"):
        model = LongCatVideoTransformer3DModel(**config)
    model.to_empty(device=device)
    with torch.no_grad():  # random weights on the device itself: no host copy of 13.6B parameters
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0, 0.02)
            else:
                param.fill_(1.0 if name.endswith("norm.weight") else 0.0)
    return model.to(dtype)


def attention_context(attention: str):
    if attention == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return sdpa_kernel([backends[attention]])


def run_config(model, shape: Shape, args, *, attention: str, keep_blocks: int, compiled: bool, device) -> dict:
    dtype = next(model.parameters()).dtype
    model.enable_gradient_checkpointing()
    model.checkpointed_blocks = len(model.blocks) - keep_blocks
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    t, h, w = shape.latent()
    g = torch.Generator(device="cpu").manual_seed(0)
    clip = torch.randn(1, 16, t, h, w, generator=g).to(device)
    start = clip[:, :, :1].clone()
    text_len = TEXT_TOKENS if not args.tiny else 16
    text = torch.randn(1, 1, text_len, model.config.caption_channels, generator=g).to(device)
    mask = torch.zeros(1, text_len, dtype=torch.int64, device=device)
    mask[:, : min(TEXT_VALID, text_len)] = 1
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    with attention_context(attention):
        for step in range(args.warmup + args.steps):
            sigma = flow.sample_sigmas(1, 12.0, g).to(device)
            noise = torch.randn(clip.shape, generator=g).to(device)
            sync()
            began = time.perf_counter()
            loss = flow.training_loss(model, clip, start, text, mask, sigma, noise, dtype)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            if step >= args.warmup:
                times.append(time.perf_counter() - began)
                losses.append(loss.item())
    fwd, formula = forward_flops(model, shape, text_len)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"shape": f"{shape.height}x{shape.width}x{shape.frames}", "attention": attention, "compiled": compiled,
            "checkpointed_blocks": model.checkpointed_blocks, "median_step_s": round(seconds, 3),
            "peak_gib": round(peak, 1), "forward_tflop": round(fwd / 1e12, 1),
            "mfu_pct": round(100 * 3 * fwd / seconds / PEAK_FLOPS, 1), "losses": [round(x, 4) for x in losses],
            "flops_formula": formula}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="93,61,33", help="frame counts at 480x832")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="cudnn,cudnn+compile,cudnn+compile+keep2",
                        help="optimized configurations, each '+'-joined from: an attention kernel (default, cudnn, "
                        "flash, efficient), 'compile' (torch.compile each block), 'keepN' (N blocks keep their "
                        "activations instead of recomputing them); compiled variants must come last")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, to test this script")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build_model(args.tiny, device, dtype)
    lora.add_lora(model, LoraSpec(rank=8))
    model.train()
    shapes = [Shape(64, 96, 9)] if args.tiny else [Shape(480, 832, int(f)) for f in args.shapes.split(",")]
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "params": sum(p.numel() for p in model.parameters())}), flush=True)
    def report(config: str, **options) -> None:
        for shape in shapes:
            print(json.dumps({"config": config, **run_config(model, shape, args, device=device, **options)}),
                  flush=True)

    if not args.no_baseline:
        report("baseline", attention="default", keep_blocks=0, compiled=False)
    compiled = False
    for variant in args.variants.split(","):
        options = variant.split("+")
        if "compile" in options and not compiled:
            for block in model.blocks:
                block.compile()
            compiled = True
        elif compiled and "compile" not in options:
            raise SystemExit(f"--variants: {variant!r} comes after a compiled variant; put compiled ones last")
        keep = next((int(o[4:]) for o in options if o.startswith("keep")), 0)
        attention = next((o for o in options if o in ("default", "cudnn", "flash", "efficient")), "default")
        report(variant, attention=attention, keep_blocks=keep, compiled=compiled)


if __name__ == "__main__":
    main()
