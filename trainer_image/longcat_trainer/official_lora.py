"""The checkpoint's distillation LoRA (`lora/cfg_step_lora.safetensors`), applied only while sampling.

File layout (the official `lora_utils.py`): per adapted Linear `<name>.lora_down.weight` [r, in],
`<name>.lora_up.weight` [out, r] (or `<name>.lora_up.blocks.<i>.weight` [out/n, r], each block reading its own
r of the down projection's n*r outputs) and `<name>.alpha_scale`; `<name>` is the module path written as
lora.py's `official_name`. The official DiT (`enable_loras`) adds multiplier * alpha_scale * up(down(x)), in
the model's dtype, to each module's output, summed over every enabled LoRA; the demo loads this one with
multiplier 1.0.

Here the delta is a forward hook on the module (peft's layer, when the trained LoRA adapts it), removed when the
`active` block ends: nothing is merged into the base, and the trained LoRA's parameters, gradients and optimizer
state are never touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from longcat_job.failures import InvalidConfigError
from longcat_job.lora_files import official_module
from longcat_job.model_source import CFG_STEP_LORA


MULTIPLIER = 1.0  # the official demo's load_lora default


@dataclass(frozen=True)
class OfficialLoraFactor:
    down: torch.Tensor  # [n*r, in]
    ups: tuple[torch.Tensor, ...]  # n blocks of [out/n, r]
    scale: float  # multiplier * alpha_scale

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.nn.functional.linear(x, self.down.to(x.dtype))
        parts = hidden.chunk(len(self.ups), dim=-1)
        return torch.cat([torch.nn.functional.linear(p, up.to(x.dtype)) for p, up in zip(parts, self.ups)], -1) * self.scale

    def weight_delta(self) -> torch.Tensor:
        """The [out, in] matrix the factor adds to its Linear's weight (for tests and merging)."""
        downs = self.down.float().chunk(len(self.ups), dim=0)
        return torch.cat([up.float() @ d for up, d in zip(self.ups, downs)], dim=0) * self.scale


OfficialLora = dict[str, OfficialLoraFactor]  # module path -> factor


def parse(state: dict[str, torch.Tensor], multiplier: float = MULTIPLIER) -> OfficialLora:
    names = {key.removesuffix(".lora_down.weight") for key in state if key.endswith(".lora_down.weight")}
    lora: OfficialLora = {}
    for name in sorted(names):
        ups = [state[k] for k in sorted((k for k in state if k.startswith(f"{name}.lora_up.blocks.")),
                                        key=lambda k: int(k.rsplit(".", 2)[1]))] or [state[f"{name}.lora_up.weight"]]
        alpha_scale = float(state[f"{name}.alpha_scale"]) if f"{name}.alpha_scale" in state else 1.0
        lora[official_module(name)] = OfficialLoraFactor(state[f"{name}.lora_down.weight"], tuple(ups),
                                                         multiplier * alpha_scale)
    return lora


def load(model_root: Path, device: torch.device, dtype: torch.dtype) -> OfficialLora:
    """The checkpoint's cfg-step LoRA on `device` in `dtype`; refuses a checkpoint without it."""
    path = Path(model_root) / CFG_STEP_LORA
    if not path.is_file():
        raise InvalidConfigError(f"spec.validation.sampler distilled: the checkpoint {model_root} has no "
                                 f"{CFG_STEP_LORA}; add it from the official checkpoint, or use sampler standard")
    return moved(parse(load_file(str(path))), device, dtype)


def moved(lora: OfficialLora, device: torch.device, dtype: torch.dtype) -> OfficialLora:
    """The factors on `device` in `dtype`: the official DiT runs them in the model's dtype."""
    return {m: OfficialLoraFactor(f.down.to(device, dtype), tuple(u.to(device, dtype) for u in f.ups), f.scale)
            for m, f in lora.items()}


@contextlib.contextmanager
def active(model: nn.Module, lora: OfficialLora, *, source: str = CFG_STEP_LORA,
           fix: str = "use sampler standard or the matching checkpoint") -> Iterator[None]:
    """`lora`'s deltas added to its modules' outputs inside the block; every hook removed after it. `source` and
    `fix` name the file and the remedy when the LoRA adapts modules this DiT does not have.

    Compiled blocks: dynamo does not guard on module hooks (`skip_nnmodule_hook_guards`), so a graph traced
    without these hooks keeps running without them, and one traced with them keeps them. Every no-grad DiT call
    of a sampler therefore runs inside this block (its first step traces the no-grad graph), and a process that
    samples with different LoRAs resets dynamo first (preview.PreviewModel)."""
    modules = dict(model.named_modules())
    unknown = sorted(set(lora) - set(modules))
    if unknown:
        raise InvalidConfigError(f"{source}: modules {unknown[:3]} are not in this DiT; the file belongs to another "
                                 f"model, {fix}")
    handles = []
    try:
        for name, factor in lora.items():
            handles.append(modules[name].register_forward_hook(
                lambda _m, args, out, f=factor: out + f.delta(args[0]).to(out.dtype)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def synthetic_state(model: nn.Module, targets: list[str], rank: int, *, seed: int = 0,
                    alpha: float | None = None) -> dict[str, torch.Tensor]:
    """A random cfg-step LoRA for `model` in the official file format (the tiny checkpoint's, for tests)."""
    from .lora import official_name, target_modules  # noqa: PLC0415

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for module in target_modules(model, targets):
        linear = model.get_submodule(module)
        name = official_name(module)
        state[f"{name}.lora_down.weight"] = torch.randn(rank, linear.in_features, generator=generator) * 0.1
        state[f"{name}.lora_up.weight"] = torch.randn(linear.out_features, rank, generator=generator) * 0.1
        state[f"{name}.alpha_scale"] = torch.tensor((alpha or rank) / rank)
    return state
