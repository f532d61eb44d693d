"""The LoRA format that ComfyUI loads for LongCat-Video, and our own reader of it.

ComfyUI runs LongCat-Video through kijai's ComfyUI-WanVideoWrapper, which loads it into its Wan model class
(LongCat is recognised by its 4096-wide blocks) with Wan's module names, where attention projections are
separate Linears. A LoRA whose keys name our modules (`attn.qkv`, `cross_attn.kv_linear`, ...) therefore
matches nothing there: "lora key not loaded". This file names Wan's modules instead:

    ours (LongCat DiT)          ComfyUI / WanVideoWrapper
    blocks.N.attn.qkv           blocks.N.self_attn.q, .k, .v   (rows 0:C, C:2C, 2C:3C of the fused weight)
    blocks.N.attn.proj          blocks.N.self_attn.o
    blocks.N.cross_attn.q_linear blocks.N.cross_attn.q
    blocks.N.cross_attn.kv_linear blocks.N.cross_attn.k, .v    (rows 0:C, C:2C)
    blocks.N.cross_attn.proj    blocks.N.cross_attn.o
    blocks.N.ffn.w1, w2, w3     the same names
    anything else               its own name (no Wan counterpart is known; ComfyUI reports it as not loaded)

Keys are `diffusion_model.<module>.lora_A.weight` [r, in], `.lora_B.weight` [out, r] and `.alpha` (a scalar):
ComfyUI scales B A by alpha / r (r the rows of lora_A), and by 1 without an alpha. A fused projection's
adapter splits exactly: its one A serves each part, with that part's rows of B, so q, k and v each get
(A, B[rows]) and the same alpha.
"""

from __future__ import annotations

import logging
import re

import torch
from safetensors.torch import save as save_safetensors
from torch import nn

from longcat_job.api import LoraSpec

log = logging.getLogger(__name__)

COMFYUI_PREFIX = "diffusion_model."
# Our module's last two name parts -> the Wan names of its parts, in the fused weight's row order.
SPLITS: dict[str, tuple[str, ...]] = {
    "attn.qkv": ("self_attn.q", "self_attn.k", "self_attn.v"),
    "attn.proj": ("self_attn.o",),
    "cross_attn.q_linear": ("cross_attn.q",),
    "cross_attn.kv_linear": ("cross_attn.k", "cross_attn.v"),
    "cross_attn.proj": ("cross_attn.o",),
    **{f"ffn.{w}": (f"ffn.{w}",) for w in ("w1", "w2", "w3")},
}
_BLOCK_MODULE = re.compile(r"^(blocks\.\d+)\.(.+)$")


def known(module: str) -> bool:
    """Whether the module has a WanVideoWrapper name (the table of the module docstring)."""
    match = _BLOCK_MODULE.match(module)
    return match is not None and match.group(2) in SPLITS


def comfyui_names(module: str) -> tuple[str, ...]:
    """Our module path -> the module paths it becomes in ComfyUI, one per row group of its weight."""
    match = _BLOCK_MODULE.match(module)
    if match is None or match.group(2) not in SPLITS:
        return (module,)
    return tuple(f"{match.group(1)}.{part}" for part in SPLITS[match.group(2)])


def comfyui_state(state: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """peft state (`<module>.lora_A.weight`, `.lora_B.weight`) -> ComfyUI's keys (see the module docstring)."""
    alpha = torch.tensor(float(spec.alpha if spec.alpha is not None else spec.rank))
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for module in sorted({key.rsplit(".", 2)[0] for key in state}):
        down, up = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        names = comfyui_names(module)
        if not known(module):
            unmapped.append(module)
        for name, rows in zip(names, up.chunk(len(names), dim=0)):
            key = COMFYUI_PREFIX + name
            out[f"{key}.lora_A.weight"] = down.clone()  # each part its own copy: safetensors refuses shared ones
            out[f"{key}.lora_B.weight"] = rows.contiguous()
            out[f"{key}.alpha"] = alpha.clone()
    if unmapped:
        log.warning("ComfyUI LoRA: %d modules have no WanVideoWrapper name (e.g. %s); ComfyUI will not load them",
                    len(unmapped), unmapped[0])
    return out


def comfyui_file(state: dict[str, torch.Tensor], spec: LoraSpec) -> bytes:
    metadata = {"rank": str(spec.rank), "alpha": str(spec.alpha or spec.rank), "format": "comfyui-wanvideo-longcat"}
    return save_safetensors(comfyui_state(state, spec), metadata=metadata)


def merge_comfyui_lora(dit: nn.Module, tensors: dict[str, torch.Tensor], strength: float = 1.0) -> None:
    """Adds a ComfyUI-format LoRA into `dit`'s weights as ComfyUI does (W += strength * alpha/r * B A per key),
    mapping Wan's module names back to ours and stacking the parts of a fused projection in row order."""
    ours: dict[str, str] = {}  # Wan module -> our module
    for module, linear in dit.named_modules():
        if isinstance(linear, nn.Linear):
            ours.update(dict.fromkeys(comfyui_names(module), module))
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    for key in tensors:
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix(COMFYUI_PREFIX).removesuffix(".lora_A.weight")
        if name not in ours:
            raise KeyError(f"ComfyUI LoRA key {key} names no module of this DiT")
        down, up = tensors[key].float(), tensors[f"{COMFYUI_PREFIX}{name}.lora_B.weight"].float()
        alpha = tensors.get(f"{COMFYUI_PREFIX}{name}.alpha")
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        deltas.setdefault(ours[name], {})[name] = strength * scale * (up @ down)
    with torch.no_grad():
        for module, parts in deltas.items():
            names = comfyui_names(module)
            linear = dit.get_submodule(module)
            rows = linear.out_features // len(names)
            delta = torch.cat([parts.get(n, torch.zeros(rows, linear.in_features)) for n in names])
            linear.weight += delta.to(linear.weight.dtype)
