"""Encoding what a sample lacks in the caches: the VAE, text encoder and tokenizer, loaded on first use."""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan
from safetensors.torch import save as save_safetensors
from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

from longcat_job.api import JobSpec
from longcat_job.buckets import Bucket
from longcat_job.storage import ObjectStore

from ..data.entries import Layout, Ref, read_layout
from ..data.shards import ShardReader
from ..data.video import BadSampleError, prepare_sample
from ..model import encode, loading
from .plan import Plan


class Encoders:
    """The VAE, text encoder and tokenizer, loaded on first use and freed by `close`."""

    def __init__(self, model_root: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.root, self.device, self.dtype = model_root, device, dtype
        self._vae: AutoencoderKLWan | None = None
        self._text: tuple[PreTrainedTokenizerBase, UMT5EncoderModel] | None = None

    def vae(self) -> AutoencoderKLWan:
        if self._vae is None:
            # float32: latents are encoded once and trained on many times.
            self._vae = loading.load_vae(self.root, dtype=torch.float32, device=self.device).eval()
        return self._vae

    def text(self, prompt: str) -> dict[str, torch.Tensor]:
        if self._text is None:
            self._text = (loading.load_tokenizer(self.root),
                          loading.load_text_encoder(self.root, dtype=self.dtype, device=self.device))
        states, mask = encode.encode_prompts(*self._text, [prompt])
        # Only the real tokens are stored; `text_batch` pads back to MAX_TEXT_TOKENS with zeros.
        return {"states": states[0, 0, : int(mask.sum())].float().cpu().contiguous()}

    def close(self) -> None:
        self._vae = self._text = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def put_entry(store: ObjectStore, key: str, tensors: dict[str, torch.Tensor], bucket: Bucket | None = None) -> None:
    metadata = {"bucket": str(bucket)} if bucket else {}
    store.put_bytes(key, save_safetensors(tensors, metadata=metadata))


def encode_missing(
    plan: Plan, spec: JobSpec, reader: ShardReader, stores: dict[str, ObjectStore], encoders: Encoders, have: set[Ref]
) -> Layout:
    """Fill the missing entries of one sample; raises BadSampleError for unusable input."""
    dataset = spec.dataset(plan.dataset_id)
    layout: Layout | None = None
    if plan.clip not in have or plan.start not in have:
        # A ReadError (S3 unreachable, object changed since the manifest) is not bad data: it fails the job.
        clip = reader.fetch(plan.dataset_id, plan.sample.clip)
        frame = reader.fetch(plan.conditioning_id, plan.sample.start_frames[plan.conditioning_id])
        prepared = prepare_sample(
            clip, frame, frame_counts=dataset.frame_counts(), resolution=dataset.resolution, alignment=spec.aspect_bucket_alignment,
            clip_name=plan.name,
            frame_name=f"{plan.conditioning_id}/{plan.sample.start_frames[plan.conditioning_id].key}",
        )
        bucket = prepared.bucket
        layout = Layout(bucket, prepared.video.shape[1])
        vae = encoders.vae()
        latents = encode.encode_video_latents(vae, prepared.video[None])
        start = encode.encode_video_latents(vae, prepared.start_frame[None])
        put_entry(stores[plan.clip.store], plan.clip.key, {"latents": latents[0].float().cpu().contiguous()}, bucket)
        put_entry(stores[plan.start.store], plan.start.key, {"latents": start[0].float().cpu().contiguous()}, bucket)
    if plan.text not in have:
        caption = ""
        if plan.sample.caption is not None:
            caption = reader.fetch(plan.dataset_id, plan.sample.caption).read_text(encoding="utf-8", errors="replace")
            if not caption.strip():
                raise BadSampleError(
                    f"{plan.dataset_id}/{plan.sample.caption.key}: empty caption; write the caption or drop the clip"
                )
        put_entry(stores[plan.text.store], plan.text.key, encoders.text(caption))
    return layout or read_layout(stores[plan.clip.store], plan.clip.key)
