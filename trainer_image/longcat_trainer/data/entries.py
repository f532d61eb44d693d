"""A training sample as the caches hold it: references to its entries, and reading them into batch tensors.

The caches (cache/) write these entries; the batch stream (batches.py) reads them. An entry is a safetensors
file: clip or start-frame latents (with the sample's bucket in its metadata) or a caption's text states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors.torch import load as load_safetensors

from longcat_job.buckets import Bucket
from longcat_job.lora_files import safetensors_header
from longcat_job.storage import ObjectStore

from ..model import encode


@dataclass(frozen=True)
class Ref:
    """One cache entry: the dataset whose cache holds it, and its key there."""

    store: str
    key: str


@dataclass(frozen=True, order=True)
class Layout:
    """What a batch must share: the frame size bucket and the frame count (the clip's frame bucket)."""

    bucket: Bucket
    frames: int


@dataclass(frozen=True)
class TrainSample:
    name: str  # dataset/stem, for messages
    clip: Ref
    start: Ref
    text: Ref
    layout: Layout
    caption_dropout: float = 0.0  # its dataset's captionDropout


def read_entry(store: ObjectStore, key: str) -> dict[str, torch.Tensor]:
    return load_safetensors(store.get_bytes(key))


def read_layout(store: ObjectStore, key: str) -> Layout:
    """The bucket (in the metadata) and frame count (from the latents' shape) of a clip's latent entry, read from
    its safetensors header without fetching the tensors."""
    header = safetensors_header(store, key)
    latent_frames = header["latents"]["shape"][1]  # [C, T, H, W]: the VAE keeps frame 0 and packs 4 per latent
    return Layout(Bucket.parse(header["__metadata__"]["bucket"]), (latent_frames - 1) * 4 + 1)


def text_batch(
    entries: list[dict[str, torch.Tensor]], max_length: int = encode.MAX_TEXT_TOKENS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stored caption states -> states [B, 1, max_length, D] zero-padded and mask [B, max_length], as encoded."""
    width = entries[0]["states"].shape[-1]
    states = torch.zeros(len(entries), 1, max_length, width)
    mask = torch.zeros(len(entries), max_length, dtype=torch.int64)
    for i, entry in enumerate(entries):
        n = entry["states"].shape[0]
        states[i, 0, :n] = entry["states"]
        mask[i, :n] = 1
    return states, mask
