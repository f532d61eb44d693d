"""Loading the LongCat-Video stack from the official checkpoint layout.

    <root>/dit/           LongCatVideoTransformer3DModel (this project's), config.json + safetensors shards
    <root>/vae/           diffusers AutoencoderKLWan
    <root>/text_encoder/  transformers UMT5EncoderModel
    <root>/tokenizer/     its tokenizer
    <root>/scheduler/     diffusers FlowMatchEulerDiscreteScheduler

Before any weight is read, every safetensors header of a folder is checked against the model built on the
meta device, so a wrong or truncated checkpoint fails in seconds with the folder, the tensor and both shapes.
The weights are then loaded by the libraries' own meta-device loaders, tensor by tensor, straight into the
requested dtype and device: the 13.6B DiT never exists as a float32 copy in host memory.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    PreTrainedTokenizerBase,
    UMT5Config,
    UMT5EncoderModel,
)

from longcat_job.failures import InvalidConfigError

from .dit import LongCatVideoTransformer3DModel
from .sources import SUBFOLDERS

log = logging.getLogger(__name__)

INDEX_SUFFIX = ".safetensors.index.json"


class CheckpointError(InvalidConfigError):
    """A checkpoint folder that cannot be loaded; the message names the folder and what to fix."""


@dataclass
class ModelStack:
    dit: LongCatVideoTransformer3DModel
    vae: AutoencoderKLWan
    text_encoder: UMT5EncoderModel
    tokenizer: PreTrainedTokenizerBase
    scheduler: FlowMatchEulerDiscreteScheduler


def subfolder(root: Path, name: str) -> Path:
    """root/name, which must exist and hold a config (tokenizer: its tokenizer files)."""
    folder = Path(root) / name
    if not folder.is_dir():
        present = sorted(p.name for p in Path(root).iterdir()) if Path(root).is_dir() else []
        raise CheckpointError(
            f"checkpoint {root} has no {name}/ folder (found: {', '.join(present) or 'nothing'}); the official "
            f"layout is {', '.join(s + '/' for s in SUBFOLDERS)}"
        )
    if not any(folder.glob("*.json")):
        raise CheckpointError(f"{folder} holds no config .json file; copy the complete {name}/ folder of the checkpoint")
    return folder


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files of a model folder: those named by its shard index if there is one, else all *.safetensors."""
    indexes = sorted(folder.glob(f"*{INDEX_SUFFIX}"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in {indexes[0].name} are missing: {', '.join(missing)}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} holds no .safetensors weights")
    return files


def checkpoint_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers alone (no tensor data is read)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors_files(folder):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                shapes[name] = tuple(handle.get_slice(name).get_shape())
    return shapes


def check_shapes(folder: Path, model: torch.nn.Module, *, exact_names: bool) -> None:
    """Refuse a folder whose tensors differ in shape from the (meta) model's, and with exact_names in names."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = checkpoint_shapes(folder)
    for name, shape in found.items():
        if name in expected and expected[name] != shape:
            raise CheckpointError(
                f"{folder}: tensor {name} has shape {list(shape)} in the checkpoint but the model built from "
                f"{folder / 'config.json'} expects {list(expected[name])}; the weights and config.json do not belong together"
            )
    if exact_names:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        if missing or unexpected:
            raise CheckpointError(
                f"{folder}: tensor names differ from the model's: missing {missing[:5]} ({len(missing)} in all), "
                f"unexpected {unexpected[:5]} ({len(unexpected)} in all); is this a LongCat-Video dit/ folder?"
            )


def load_dit(root: Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> LongCatVideoTransformer3DModel:
    folder = subfolder(root, "dit")
    config = LongCatVideoTransformer3DModel.load_config(folder)
    with torch.device("meta"):
        skeleton = LongCatVideoTransformer3DModel.from_config(config)
    check_shapes(folder, skeleton, exact_names=True)
    log.info("loading DiT from %s as %s on %s", folder, dtype, device)
    return LongCatVideoTransformer3DModel.from_pretrained(
        root, subfolder="dit", torch_dtype=dtype, device_map={"": torch.device(device)}, low_cpu_mem_usage=True
    )


def load_vae(root: Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> AutoencoderKLWan:
    folder = subfolder(root, "vae")
    with init_empty_weights():
        skeleton = AutoencoderKLWan.from_config(AutoencoderKLWan.load_config(folder))
    check_shapes(folder, skeleton, exact_names=False)
    return AutoencoderKLWan.from_pretrained(
        root, subfolder="vae", torch_dtype=dtype, device_map={"": torch.device(device)}, low_cpu_mem_usage=True
    )


def load_text_encoder(root: Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> UMT5EncoderModel:
    folder = subfolder(root, "text_encoder")
    with torch.device("meta"):
        skeleton = UMT5EncoderModel(UMT5Config.from_pretrained(folder))
    check_shapes(folder, skeleton, exact_names=False)
    return UMT5EncoderModel.from_pretrained(folder, dtype=dtype, device_map=torch.device(device)).eval()


def load_tokenizer(root: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(subfolder(root, "tokenizer"))


def load_scheduler(root: Path) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_pretrained(subfolder(root, "scheduler"))


def load_stack(
    root: Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    vae_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> ModelStack:
    """All five parts. Every folder is checked to exist before the first (slow) load starts."""
    for name in SUBFOLDERS:
        subfolder(root, name)
    return ModelStack(
        dit=load_dit(root, dtype=dtype, device=device),
        vae=load_vae(root, dtype=vae_dtype, device=device),
        text_encoder=load_text_encoder(root, dtype=dtype, device=device),
        tokenizer=load_tokenizer(root),
        scheduler=load_scheduler(root),
    )
