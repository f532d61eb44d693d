"""The full-size LoRA training step of the trainer on one GPU: seconds, peak memory, FLOPs and MFU per shape.

Builds the released DiT configuration on the GPU with random bf16 weights (built on the meta device, no host
copy), adds the spec's LoRA (rank 8 on qkv, proj, q_linear, kv_linear by default), and times the trainer's own
step: `flow.training_loss` (frame 0 clean at t = 0, loss on frames 1..), backward, gradient clipping,
AdamW. Each configuration runs in the same process, so their ratio is measured on the same card:

    baseline   eager, SDPA's default kernel choice, every block checkpointed (recomputed whole), peft's float32
               adapter math: the code as it was before any of the optimizations
    variants   the optimizations of --variants, each measured on its own; `compile+sac` is the trainer's default
               (model/prepare.py: regional compile, as many blocks keeping attention as the card holds, adapter
               products in bf16)

Each compiled configuration is traced afresh (dynamo reset), and its first step fails loudly if it traced no
graph of its own.

Every configuration starts from the same LoRA initialisation and draws the same sigmas and noise, so the
printed losses of two configurations are one loss curve computed two ways (--steps 20 --warmup 0 gives the
20-step comparison; each line prints the largest relative difference to the baseline's losses).

Forward FLOPs are counted analytically from the model's shapes (printed with the formula); MFU is
3 x forward FLOPs / step seconds / peak (989e12: H100 SXM dense bf16), the usual convention that does not credit
the recomputation of checkpointed blocks.

    python bench/train_step_bench.py [--shapes 93,61,33] [--steps 5] [--variants cudnn+compile,cudnn+compile+sac]
    python bench/train_step_bench.py --shapes 33 --grad-check --variants flash,cudnn+compile,cudnn+compile+sac
    python bench/train_step_bench.py --shapes 93 --card-gib 48 \
        --variants cudnn+compile+sac,cudnn+compile+offload,cudnn+compile+sac+offload
    python bench/train_step_bench.py --tiny   # the same code path on the CPU at tiny size (for tests)

'offload' streams the block weights from host memory (training.offload: blocks); with --card-gib N the offload
variants run capped at N GiB and plan selective checkpointing for that card, so a step that finishes fits it.

--grad-check prints, instead of times, how far each configuration's LoRA gradient (one fixed batch, adapters
at a trained-like state) is from the baseline's; a different attention kernel ('flash') gives the size of
bf16 rounding noise to compare with.
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

from longcat_job.api import LoraSpec  # noqa: E402
from longcat_trainer import flow, lora  # noqa: E402
from longcat_trainer.model import offload, quantize, recompute  # noqa: E402
from longcat_trainer.model.dit import LongCatVideoTransformer3DModel  # noqa: E402
from longcat_trainer.model.prepare import BlockPlan  # noqa: E402

PEAK_FLOPS = 989e12  # H100 SXM, dense bf16
TEXT_TOKENS, TEXT_VALID = 512, 120
QUANTIZATION = {"fp8": "fp8-torchao", "int8": "int8-quanto"}  # variant option -> spec.training.baseQuantization
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
    torch.manual_seed(0)
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


@dataclass(frozen=True)
class Config:
    name: str
    attention: str = "default"
    compiled: bool = False
    kept_attention: str = "0"  # blocks keeping their self-attention output: a number or "plan" (by memory)
    quantization: str | None = None
    fp32_adapters: bool = False  # peft's own adapter math (float32 copies of the activations)
    offload: bool = False  # block weights in host memory, streamed in (spec.training.offload: blocks)

    @property
    def irreversible(self) -> bool:
        """Quantized or offloaded: the model stays so for the configurations after it."""
        return self.quantization is not None or self.offload

    @classmethod
    def parse(cls, variant: str) -> Config:
        options = variant.split("+")
        known = {"default", "cudnn", "flash", "efficient", "compile", "sac", "fp32lora", "offload", *QUANTIZATION}
        unknown = [o for o in options if o not in known and not (o.startswith("sac") and o[3:].isdigit())]
        if unknown:
            raise SystemExit(f"--variants: {variant!r} has unknown options {unknown}")
        sac = next((o for o in options if o.startswith("sac")), None)
        return cls(
            name=variant,
            attention=next((o for o in options if o in ("default", "cudnn", "flash", "efficient")), "default"),
            compiled="compile" in options,
            kept_attention="0" if sac is None else (sac[3:] or "plan"),
            quantization=next((QUANTIZATION[o] for o in options if o in QUANTIZATION), None),
            fp32_adapters="fp32lora" in options,
            offload="offload" in options,
        )


def kept_blocks(model, config: Config, tokens: int, device,
                streamed: offload.StreamedBlocks | None) -> recompute.Kept:
    """'sacN': N blocks keep their self-attention output, none their matmuls'; 'sac': the trainer's plan (as much
    as fits in 3/4 of the card, recompute.py; with offload counting only the streamed blocks' weights, as
    model/prepare.py does)."""
    if config.kept_attention != "plan":
        return recompute.Kept(attention=int(config.kept_attention))
    window = streamed.window_bytes if config.offload else 0
    return recompute.blocks_that_fit(model, tokens, device, streamed_bytes=window)


def traced_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def apply_plan(model, config: Config, kept: recompute.Kept, streamed: offload.StreamedBlocks | None) -> int:
    """The trainer's block plan (checkpointing always on, as in training) and adapter math for this
    configuration, traced afresh: dynamo guards neither on the SDPA kernel nor on a checkpointing policy, so a
    graph compiled for an earlier configuration would otherwise be reused (check_traced_fresh tells). Returns
    the count of graphs traced so far."""
    torch._dynamo.reset()
    lora.set_adapter_math(model, in_input_dtype=not config.fp32_adapters)
    BlockPlan(checkpointing=True, kept=kept, compile=config.compiled).apply(
        model, streamed if config.offload else None)
    return traced_graphs()


def check_traced_fresh(config: Config, graphs_before: int) -> None:
    """Fails loudly when a compiled configuration's first step traced no graph of its own: it then ran a
    region compiled under another kernel choice or checkpointing policy, and its figures would be that one's."""
    if config.compiled and traced_graphs() == graphs_before:
        raise SystemExit(f"{config.name}: its first step traced no graph, so it reused one compiled for an earlier "
                         "configuration (dynamo does not guard on the SDPA kernel or the checkpointing policy)")


def random_batch(model, shape: Shape, args, g: torch.Generator, device) -> tuple[torch.Tensor, ...]:
    """Clip latents [1, 16, T, H, W], caption states and a mask with TEXT_VALID real tokens, drawn from g."""
    t, h, w = shape.latent()
    clip = torch.randn(1, 16, t, h, w, generator=g).to(device)
    text_len = TEXT_TOKENS if not args.tiny else 16
    text = torch.randn(1, 1, text_len, model.config.caption_channels, generator=g).to(device)
    mask = torch.zeros(1, text_len, dtype=torch.int64, device=device)
    mask[:, : min(TEXT_VALID, text_len)] = 1
    return clip, text, mask


def trained_like(initial_lora: dict, g: torch.Generator) -> dict:
    """Adapters as after some training (B != 0): from B = 0, Adam's first steps are about lr * sign(g) per
    element, so rounding-level differences between configurations become full-size steps."""
    return {k: v if "lora_A" in k else 1e-3 * torch.randn(v.shape, generator=g) for k, v in initial_lora.items()}


def run_config(model, shape: Shape, args, config: Config, initial_lora: dict, device,
               streamed: offload.StreamedBlocks | None) -> dict:
    """Times the step; with --overfit, trains one fixed batch at one sigma from trained-like adapters instead
    (a loss curve that tells the numerics of two configurations apart)."""
    dtype = model.x_embedder.proj.weight.dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    # every configuration trains from the same adapters
    lora.load_lora_state(model, trained_like(initial_lora, g) if args.overfit else initial_lora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    t, h, w = shape.latent()
    clip, text, mask = random_batch(model, shape, args, g, device)
    fixed_sigma = torch.tensor([0.6], device=device)
    fixed_noise = torch.randn(clip.shape, generator=g).to(device)
    start = clip[:, :, :1].clone()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    kept = kept_blocks(model, config, t * (h // 2) * (w // 2), device, streamed)
    graphs = apply_plan(model, config, kept, streamed)
    times, losses = [], []
    with attention_context(config.attention):
        for step in range(args.warmup + args.steps):
            if args.overfit:
                sigma, noise = fixed_sigma, fixed_noise
            else:
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
            times.append(time.perf_counter() - began)
            losses.append(loss.item())
            if step == 0:
                check_traced_fresh(config, graphs)
    if args.profile and device.type == "cuda":
        profile_step(lambda: flow.training_loss(model, clip, start, text, mask, sigma, noise, dtype).backward(),
                     config)
    fwd, formula = forward_flops(model, shape, text.shape[2])
    seconds = statistics.median(times[args.warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"shape": f"{shape.height}x{shape.width}x{shape.frames}", "attention": config.attention,
            "compiled": config.compiled, "attention_kept_blocks": kept.attention,
            "matmul_kept_blocks": kept.matmuls, "offload": config.offload,
            "quantization": config.quantization, "median_step_s": round(seconds, 3),
            "peak_gib": round(peak, 1), "forward_tflop": round(fwd / 1e12, 1),
            "mfu_pct": round(100 * 3 * fwd / seconds / PEAK_FLOPS, 1), "losses": losses, "flops_formula": formula}


def profile_step(step, config: Config) -> None:
    """CUDA kernel time of one step by kernel, to see where the time goes (printed, not part of the figures)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"profile of {config.name}:\n" + prof.key_averages().table(sort_by="cuda_time_total", row_limit=25,
                                                                     max_name_column_width=90), flush=True)


def lora_gradient(model, shape: Shape, args, config: Config, initial_lora: dict, device,
                  streamed: offload.StreamedBlocks | None) -> torch.Tensor:
    """The LoRA gradient of one fixed batch at a trained-like adapter state (B != 0), all adapters flattened.

    Comparing it between configurations tells whether an optimization changes the gradient by more than a
    different attention kernel does (rounding), independent of how the optimizer amplifies differences.
    """
    g = torch.Generator(device="cpu").manual_seed(1)
    lora.load_lora_state(model, trained_like(initial_lora, g))
    t, h, w = shape.latent()
    clip, text, mask = random_batch(model, shape, args, g, device)
    sigma, noise = torch.tensor([0.6], device=device), torch.randn(clip.shape, generator=g).to(device)
    kept = kept_blocks(model, config, t * (h // 2) * (w // 2), device, streamed)
    graphs = apply_plan(model, config, kept, streamed)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    with attention_context(config.attention):
        for _ in range(2):  # the first call compiles
            for p in params:
                p.grad = None
            flow.training_loss(model, clip, clip[:, :, :1], text, mask, sigma, noise,
                               model.x_embedder.proj.weight.dtype).backward()
            check_traced_fresh(config, graphs)
    return torch.cat([p.grad.float().flatten().cpu() for p in params])


def relative_gap(losses: list[float], reference: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(losses, reference, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="93,61,33", help="frame counts at 480x832")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="cudnn+compile,cudnn+compile+sac",
                        help="optimized configurations, each '+'-joined from: an attention kernel (default, cudnn, "
                        "flash, efficient), 'compile' (torch.compile each block), 'sac' (the trainer's plan: blocks "
                        "keep their self-attention output, then their widening matmuls' outputs, as many as fit in 3/4 "
                        "of the card; 'sacN': N blocks keep their self-attention output only), 'fp32lora' "
                        "(peft's float32 adapter math instead of the trainer's), 'fp8' or "
                        "'int8' (base weights quantized as spec.training.baseQuantization does), 'offload' (block "
                        "weights in host memory, streamed in as spec.training.offload: blocks does); quantization "
                        "and offload are irreversible, so those variants come last, all with one of them")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--profile", action="store_true", help="print a CUDA kernel profile of each variant")
    parser.add_argument("--grad-check", action="store_true",
                        help="instead of timing, print each configuration's LoRA-gradient gap to the first one's")
    parser.add_argument("--overfit", action="store_true",
                        help="train one fixed batch at one sigma from trained-like adapters (--steps 30 --warmup 0): "
                        "a loss curve per configuration, its largest gap to the first one's printed")
    parser.add_argument("--card-gib", type=float, default=None,
                        help="offload variants run as on a card of this many GiB: the process is capped there "
                        "(an allocation beyond it fails) and 'sac' plans for it")
    parser.add_argument("--tiny", action="store_true", help="tiny model on the CPU, to test this script")
    args = parser.parse_args()

    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model = build_model(args.tiny, device, dtype)
    lora.add_lora(model, LoraSpec(rank=8))
    initial_lora = lora.lora_state(model)
    model.train()
    shapes = [Shape(64, 96, 9)] if args.tiny else [Shape(480, 832, int(f)) for f in args.shapes.split(",")]
    print(json.dumps({"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                      "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
                      "params": sum(p.numel() for p in model.parameters())}), flush=True)
    configs = [Config.parse(v) for v in args.variants.split(",")]
    if not args.no_baseline:
        configs.insert(0, Config("baseline", fp32_adapters=True))
    order = [c.irreversible for c in configs]
    if order != sorted(order) or len({(c.quantization, c.offload) for c in configs if c.irreversible}) > 1:
        raise SystemExit("--variants: quantized variants come last (offloaded ones too), all with one format or all "
                         "offloaded")
    if any(c.quantization and c.offload for c in configs):
        raise SystemExit("--variants: offload streams bf16 weights, as training.offload does: not with fp8 or int8")
    baseline_losses: dict[str, list[float]] = {}
    baseline_grads: dict[Shape, torch.Tensor] = {}
    streamed = None
    for config in configs:
        if config.quantization and not hasattr(model.blocks[0].ffn.w1, "weight_q"):
            quantize.quantize_base(model, config.quantization)
        if config.offload and streamed is None:
            streamed = offload.stream_blocks(model, device)
            if args.card_gib and device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(args.card_gib * 2**30 / torch.cuda.mem_get_info()[1])
        for shape in shapes:
            if args.grad_check:
                grad = lora_gradient(model, shape, args, config, initial_lora, device, streamed)
                reference = baseline_grads.setdefault(shape, grad)
                print(json.dumps({"config": config.name, "shape": f"{shape.height}x{shape.width}x{shape.frames}",
                                  "grad_norm": grad.norm().item(),
                                  "grad_gap_to_baseline": ((grad - reference).norm() / reference.norm()).item()}),
                      flush=True)
                continue
            result = run_config(model, shape, args, config, initial_lora, device, streamed)
            if config.name == "baseline":
                baseline_losses[result["shape"]] = result["losses"]
            elif result["shape"] in baseline_losses:
                result["max_loss_gap_to_baseline"] = relative_gap(result["losses"], baseline_losses[result["shape"]])
            result["losses"] = [round(x, 5) for x in result["losses"]]
            print(json.dumps({"config": config.name, **result}), flush=True)


if __name__ == "__main__":
    main()
