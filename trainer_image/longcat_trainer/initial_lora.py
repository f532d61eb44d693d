"""The adapters a job starts from when `spec.lora.initFrom` names a LoRA of ours (either format, local or S3).

Rank and targets must be the spec's (preflight checks them from the file's header; here they are checked again
with the DiT's module names and features). When the file's alpha differs from the spec's, its up factors are
rescaled by file scale / spec scale, so the job starts from exactly the model the file describes and trains
with the spec's scale from there. Only a job's first attempt reads it: a resumed one starts from its checkpoint.
"""

from __future__ import annotations

import json
import logging

import torch
from safetensors.torch import load as load_safetensors
from torch import nn

from longcat_job.api import LoraSpec
from longcat_job.failures import InvalidConfigError
from longcat_job.lora_files import (
    INIT_FIELD,
    PEFT_CONFIG,
    LoraFolder,
    init_problems,
    module_of,
    official_module,
    read_lora_folder,
)
from longcat_job.storage import ObjectStore, store_for

from .lora import target_modules

log = logging.getLogger(__name__)


def _fit_problems(dit: nn.Module, spec: LoraSpec, folder: LoraFolder) -> list[str]:
    where = folder.where
    expected = target_modules(dit, spec.targets)
    missing = sorted(set(expected) - set(folder.modules))
    unknown = sorted(set(folder.modules) - set(expected))
    if missing or unknown:
        return [f"{INIT_FIELD}: {where} does not fit this DiT (a LoRA of another model?): no factors for "
                f"{missing[:3]}, factors for modules it lacks {unknown[:3]}"]
    wrong = [m for m in expected if folder.modules[m][1:] != (dit.get_submodule(m).in_features,
                                                              dit.get_submodule(m).out_features)]
    if wrong:
        return [f"{INIT_FIELD}: {where} has factors of other sizes than this DiT's layers, e.g. {wrong[0]} "
                f"(in, out) {folder.modules[wrong[0]][1:]}: it was trained on another model"]
    return []


def _alpha_scales(store: ObjectStore, folder: LoraFolder, tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """module -> alpha / rank of the file: the official format stores it per module, peft in its config."""
    if folder.format == "official":
        return {official_module(k.removesuffix(".alpha_scale")): float(v)
                for k, v in tensors.items() if k.endswith(".alpha_scale")}
    config = json.loads(store.get_bytes(PEFT_CONFIG)) if folder.has_peft_config else {}
    rank = next(iter(folder.ranks))
    scale = float(config.get("lora_alpha", rank)) / rank
    return dict.fromkeys(folder.modules, scale)


def initial_lora_state(spec: LoraSpec, dit: nn.Module) -> dict[str, torch.Tensor]:
    """The peft state (`<module>.lora_A.weight`, `.lora_B.weight`) of the LoRA in spec.lora.initFrom, checked
    against the spec and `dit` (before its adapters are added)."""
    assert spec.init_from is not None
    store = store_for(spec.init_from, what=INIT_FIELD)
    folder = read_lora_folder(store)
    problems = init_problems(spec, folder) or _fit_problems(dit, spec, folder)
    if problems:
        raise InvalidConfigError("; ".join(problems))
    tensors = load_safetensors(store.get_bytes(folder.key))
    scales = _alpha_scales(store, folder, tensors)
    target = (spec.alpha if spec.alpha is not None else spec.rank) / spec.rank
    state = {}
    for key, tensor in tensors.items():
        found = module_of(key)
        if found is not None:
            module, factor = found
            weight = tensor.float() if factor == "down" else tensor.float() * (scales.get(module, target) / target)
            state[f"{module}.{'lora_A' if factor == 'down' else 'lora_B'}.weight"] = weight.contiguous()
    log.info("LoRA starts from %s (%s format, %d modules)", folder.where, folder.format, len(folder.modules))
    return state
