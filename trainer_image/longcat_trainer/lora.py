"""LoRA adapters on the DiT with peft, and their export formats (a third, ComfyUI's, is comfyui_lora.py).

1. peft/diffusers: `pytorch_lora_weights.safetensors` with keys `transformer.<module>.lora_A.weight` /
   `.lora_B.weight` (diffusers' naming of a pipeline's transformer) and `adapter_config.json` (peft's
   LoraConfig), so peft and diffusers tools read it.
2. The official LongCat-Video format (its `lora_utils.py`, read by the DiT's `load_lora`): per adapted Linear
   `<name>.lora_down.weight` [r, in], `<name>.lora_up.weight` [out, r] and `<name>.alpha_scale` (alpha/r), where
   `<name>` is `lora___lorahyphen___` + the module path with every '.' written as `___lorahyphen___`. Its
   forward is W x + alpha_scale * up(down(x)), which is peft's W x + (alpha/r) * B(A(x)).
"""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from peft import (
    LoraConfig,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from longcat_job.api import LoraSpec
from longcat_job.failures import InvalidConfigError
from longcat_job.lora_files import (
    COMFYUI_WEIGHTS,
    DIFFUSERS_PREFIX,
    OFFICIAL_HYPHEN,
    OFFICIAL_PREFIX,
    OFFICIAL_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
)

from .comfyui_lora import comfyui_file
from .distributed import full_tensor



def target_modules(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the Linears whose last name part is a target (x_embedder.proj is a Conv3d: not adapted)."""
    return [
        name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]


def lora_config(spec: LoraSpec, modules: list[str]) -> LoraConfig:
    return LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha if spec.alpha is not None else spec.rank,
        lora_dropout=spec.dropout,
        target_modules=modules,
        init_lora_weights=True,  # A random, B zero: training starts from the base model exactly
    )


def add_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Freeze the base and add trainable float32 adapters to the target Linears; refuses unknown targets."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    unknown = sorted(set(spec.targets) - names)
    if unknown:
        raise InvalidConfigError(
            f"spec.lora.targets: {unknown} match no Linear of the DiT; use some of {sorted(names)} "
            "(default qkv, proj, q_linear, kv_linear)"
        )
    model.requires_grad_(False)
    inject_adapter_in_model(lora_config(spec, target_modules(model, spec.targets)), model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()  # adapters train in float32 whatever the base's dtype
            param.requires_grad_(True)
    set_adapter_math(model, in_input_dtype=True)
    return model


class _InputDtypeLinear(nn.Linear):
    """A LoRA factor that multiplies in its input's dtype: its float32 weight is cast (rank x features, a few
    KB), not the activations. Gradients reach the float32 weight through the cast."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


def set_adapter_math(model: nn.Module, *, in_input_dtype: bool) -> None:
    """Where the adapters' products run: in the activations' dtype (bf16 in training; the default), or, as peft
    does by itself, in float32 on a float32 copy of every adapted layer's input and output.

    peft's way costs a [tokens, features] float32 copy in and out of each of the 192 adapted Linears: about 0.6 s
    of a 480x832x93 step on an H100, memory-bound work, for products of rank 8 that bf16 with float32
    accumulation computes as well as the base's own (bench/README.md has the gradient gap). Parameter names
    and state dicts do not change.
    """
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.cast_input_dtype_enabled = not in_input_dtype
            for factor in (*module.lora_A.values(), *module.lora_B.values()):
                factor.__class__ = _InputDtypeLinear if in_input_dtype else nn.Linear


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's state dict of the adapters: `<module>.lora_A.weight` / `.lora_B.weight`, whole, on the CPU.

    Under FSDP this gathers the shards: every rank must call it.
    """
    state = get_peft_model_state_dict(model)
    # A copy even on the CPU: a snapshot that aliased the live parameters would change as training goes on.
    return {k: full_tensor(v).detach().to("cpu", torch.float32, copy=True).contiguous() for k, v in state.items()}


def load_lora_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise InvalidConfigError(f"LoRA weights do not fit this DiT: unexpected {result.unexpected_keys[:5]}")


def peft_files(state: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, bytes]:
    modules = sorted({key.rsplit(".", 2)[0] for key in state})  # "<module>.lora_A.weight" -> "<module>"
    config = lora_config(spec, modules).to_dict()
    config["target_modules"] = modules
    return {
        PEFT_WEIGHTS: save_safetensors({DIFFUSERS_PREFIX + k: v for k, v in state.items()}, metadata={"format": "pt"}),
        PEFT_CONFIG: json.dumps(config, indent=1, default=str).encode(),
    }


def official_name(module_path: str) -> str:
    return OFFICIAL_PREFIX + module_path.replace(".", OFFICIAL_HYPHEN)


def official_state(state: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, torch.Tensor]:
    """peft state -> the official key naming (see the module docstring)."""
    alpha = spec.alpha if spec.alpha is not None else spec.rank
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, kind = key.removesuffix(".weight").rsplit(".", 1)
        name = official_name(module)
        out[f"{name}.{'lora_down' if kind == 'lora_A' else 'lora_up'}.weight"] = tensor
        out[f"{name}.alpha_scale"] = torch.tensor(alpha / spec.rank, dtype=torch.float32)
    return out


def export_files(state: dict[str, torch.Tensor], spec: LoraSpec) -> dict[str, bytes]:
    """Every file of a LoRA export in the formats of spec.formats: name -> bytes."""
    files = peft_files(state, spec) if "peft" in spec.formats else {}
    if "official" in spec.formats:
        metadata = {"rank": str(spec.rank), "alpha": str(spec.alpha or spec.rank), "format": "longcat-video-lora"}
        files[OFFICIAL_WEIGHTS] = save_safetensors(official_state(state, spec), metadata=metadata)
    if "comfyui" in spec.formats:
        files[COMFYUI_WEIGHTS] = comfyui_file(state, spec)
    return files


def read_peft_weights(data: bytes) -> dict[str, torch.Tensor]:
    """The peft state of a `pytorch_lora_weights.safetensors` (for sampling with a finished LoRA)."""
    return {k.removeprefix(DIFFUSERS_PREFIX): v for k, v in load_safetensors(data).items()}
