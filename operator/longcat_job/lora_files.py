"""The LoRA files this project writes, named once, and what a folder of them holds, read from the safetensors
headers alone (torch-free: preflight checks `spec.lora.initFrom` before any GPU is asked for).

    pytorch_lora_weights.safetensors  peft/diffusers: `transformer.<module>.lora_A.weight` [r, in] and
                                      `.lora_B.weight` [out, r]; adapter_config.json beside it has lora_alpha
    longcat_video_lora.safetensors    the official LongCat-Video format: `lora___lorahyphen___<module with each
                                      '.' as ___lorahyphen___>.lora_down.weight` [r, in], `.lora_up.weight`
                                      [out, r], `.alpha_scale` (alpha / r)
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Literal

from .api import LoraSpec
from .failures import InvalidConfigError
from .storage import ObjectStore

PEFT_WEIGHTS = "pytorch_lora_weights.safetensors"
PEFT_CONFIG = "adapter_config.json"
OFFICIAL_WEIGHTS = "longcat_video_lora.safetensors"
COMFYUI_WEIGHTS = "longcat_video_lora_comfyui.safetensors"  # ComfyUI-WanVideoWrapper's names: comfyui_lora.py
# The weights file of each spec.lora.formats entry.
FORMAT_FILES = {"peft": PEFT_WEIGHTS, "official": OFFICIAL_WEIGHTS, "comfyui": COMFYUI_WEIGHTS}
DIFFUSERS_PREFIX = "transformer."
OFFICIAL_PREFIX = "lora___lorahyphen___"
OFFICIAL_HYPHEN = "___lorahyphen___"
INIT_FIELD = "spec.lora.initFrom"


@dataclass(frozen=True)
class LoraFolder:
    """The LoRA file of a folder that a job starts from: which one, its format, and each adapted module's
    (rank, in features, out features)."""

    key: str
    where: str  # the file's URI, for messages
    format: Literal["peft", "official"]
    modules: dict[str, tuple[int, int, int]]
    has_peft_config: bool = False  # adapter_config.json (with lora_alpha) beside a peft file

    @property
    def ranks(self) -> set[int]:
        return {rank for rank, _, _ in self.modules.values()}

    @property
    def targets(self) -> set[str]:
        return {module.rsplit(".", 1)[-1] for module in self.modules}


def safetensors_header(store: ObjectStore, key: str) -> dict[str, dict]:
    """Tensor name -> {dtype, shape, data_offsets}, and `__metadata__`, from the header only (a ranged read)."""
    with store.open_ranged(key) as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def official_module(name: str) -> str:
    """'lora___lorahyphen___blocks___lorahyphen___0...' -> 'blocks.0...'."""
    return name.removeprefix(OFFICIAL_PREFIX).replace(OFFICIAL_HYPHEN, ".")


def module_of(key: str) -> tuple[str, str] | None:
    """(module path, factor: 'down' or 'up') of a tensor name in either format; None for other tensors."""
    if key.startswith(OFFICIAL_PREFIX):
        name, _, kind = key.partition(".")
        factor = {"lora_down.weight": "down", "lora_up.weight": "up"}.get(kind)
        return (official_module(name), factor) if factor else None
    for suffix, factor in ((".lora_A.weight", "down"), (".lora_B.weight", "up")):
        if key.endswith(suffix):
            return key.removeprefix(DIFFUSERS_PREFIX).removesuffix(suffix), factor
    return None


def read_lora_folder(store: ObjectStore) -> LoraFolder:
    """The peft file of the folder, else its official one; refuses a folder with neither, or a file whose
    factors do not pair up."""
    try:
        names = {record.key for record in store.list()}
    except FileNotFoundError:
        names = set()
    key = next((k for k in (PEFT_WEIGHTS, OFFICIAL_WEIGHTS) if k in names), None)
    if key is None:
        raise InvalidConfigError(
            f"{INIT_FIELD}: {store.url} holds neither {PEFT_WEIGHTS} nor {OFFICIAL_WEIGHTS}: point it at the lora/ "
            "folder of a finished job, or a checkpoint's folder (checkpoints/step-N/)"
        )
    where = f"{store.url.rstrip('/')}/{key}"
    shapes: dict[str, dict[str, list[int]]] = {}
    for name, entry in safetensors_header(store, key).items():
        found = module_of(name)
        if found is not None:
            shapes.setdefault(found[0], {})[found[1]] = entry["shape"]
    modules = {}
    for module, factors in shapes.items():
        down, up = factors.get("down"), factors.get("up")
        if down is None or up is None or len(down) != 2 or len(up) != 2 or down[0] != up[1]:
            raise InvalidConfigError(f"{INIT_FIELD}: {where} has unpaired LoRA factors for {module}: "
                                     "it is not a LoRA this project (or peft) wrote")
        modules[module] = (down[0], down[1], up[0])
    if not modules:
        raise InvalidConfigError(f"{INIT_FIELD}: {where} holds no LoRA factors")
    peft = key == PEFT_WEIGHTS
    return LoraFolder(key, where, "peft" if peft else "official", modules,
                      has_peft_config=peft and PEFT_CONFIG in names)


def init_problems(spec: LoraSpec, folder: LoraFolder) -> list[str]:
    """What keeps the LoRA of `folder` from starting a job of `spec`: rank and targets must be the spec's."""
    problems, where = [], folder.where
    if folder.ranks != {spec.rank}:
        problems.append(f"{INIT_FIELD}: {where} has rank {', '.join(map(str, sorted(folder.ranks)))} but "
                        f"spec.lora.rank is {spec.rank}: set spec.lora.rank to the LoRA's rank")
    if folder.targets != set(spec.targets):
        problems.append(f"{INIT_FIELD}: {where} adapts {sorted(folder.targets)} but spec.lora.targets is "
                        f"{sorted(spec.targets)}: set spec.lora.targets to the LoRA's targets")
    return problems
