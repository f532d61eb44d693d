"""Validation during training: I2V videos from fixed start frames and captions, uploaded with an index page.

`Validator` fits the training loop's `Hooks.validate`: called on every rank with the step just finished, it
samples this rank's share of the validation samples (sample i runs on data-parallel group i % groups: with
context parallelism the ranks of a group sample it together, without the conditioning-frame cache), uploads

    <output>/validation/step-<N>/<i>-<stem>.mp4   H.264 video
    <output>/validation/step-<N>/<i>-<stem>.png   contact sheet (every 8th frame, step and prompt)
    <output>/validation/inputs/<i>-<stem>-start.<ext>, -clip.<ext>   the sample's start frame and source clip

and returns every rank's MP4 URIs (the same list on all ranks) for progress.json. Rank 0 keeps
`validation/index.json` (every step's files) and renders `<output>/index.html` from it: per sample its start
frame, source clip and the video of each step side by side (validation_grid.py), under the loss curve
(`loss.png`, shown once training has written it). Keys: longcat_job/output_layout.py.

Samples: the first `validation.maxSamples` of the dataset named by `validation.evalDatasetId`, else of the
manifest's validation split, else of the training split. Sample i always gets the noise of seed
`validation.seed + i`, so the videos of different steps differ only by what the LoRA learned.
Start frames and captions are encoded once, at the first validation, and kept on the CPU.
"""

from __future__ import annotations

import gc
import html
import io
import json
import logging
import mimetypes
import time
from dataclasses import dataclass, replace
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

import av
import torch

from longcat_job import output_layout
from longcat_job.api import JobSpec
from longcat_job.s3 import S3AccessError
from longcat_job.sample_manifest import Manifest, ManifestSample, read_manifest
from longcat_job.storage import ObjectStore, store_for
from longcat_job.validation_grid import render_grid, weights_shown

from . import distributed, media, official_lora
from .denoise import (
    DEFAULT_FPS,
    SamplerSettings,
    TextStates,
    initial_noise,
    latent_frames,
    load_start_frame,
    report_first_step,
    sample_latents,
    settings_for,
    to_uint8_frames,
)
from .model import encode, loading
from .report import uri

if TYPE_CHECKING:
    from .train import StepInfo

log = logging.getLogger(__name__)

def choose_samples(spec: JobSpec, manifest: Manifest) -> list[tuple[str, ManifestSample]]:
    """(dataset id, sample) of the validation samples, in manifest order (the same at every step)."""
    wanted = spec.validation.eval_dataset_id
    if wanted is not None:
        pool = [(d, s) for d, s in manifest.split("validation") + manifest.split("train") if d == wanted]
    else:
        pool = manifest.split("validation") or manifest.split("train")
    return pool[: spec.validation.max_samples]


def clip_fps(store: ObjectStore, key: str) -> float:
    """The clip's frame rate from its container header (ranged reads only), or DEFAULT_FPS when unknown."""
    try:
        with store.open_ranged(key) as raw, av.open(raw) as container:
            rate = container.streams.video[0].average_rate if container.streams.video else None
    except (av.FFmpegError, OSError) as exc:
        log.warning("validation: cannot read the frame rate of %s (%s); using %d fps", key, exc, DEFAULT_FPS)
        return DEFAULT_FPS
    return float(rate) if rate else DEFAULT_FPS


@dataclass
class PreparedSample:
    index: int  # position among the validation samples: names the files and seeds the noise
    name: str  # dataset/stem
    prompt: str
    fps: float
    start_latents: torch.Tensor  # [1, C, 1, h, w] float32, CPU
    text: TextStates  # CPU
    inputs: dict[str, str]  # "start", "clip": the output keys of the copies the report shows beside the videos


def render_index(entries: list[dict], title: str, weights: str) -> str:
    """index.html: the loss curve, then the validation grid; `weights` says which adapter weights the videos
    show. Every link is a key relative to the page, so it opens from disk or S3 without a server."""
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<img src='{output_layout.LOSS_CURVE}' alt='loss curve (written at each checkpoint)' "
        "onerror=\"this.style.display='none'\">"
        f"{render_grid(entries, weights=weights)}</body></html>"
    )


def update_index(output: ObjectStore, step: int, files: list[dict], title: str, weights: str) -> None:
    try:
        entries = json.loads(output.get_bytes(output_layout.VALIDATION_INDEX))
    except (FileNotFoundError, S3AccessError):  # the first validation of the job (a denied read fails the put below)
        entries = []
    entries = [e for e in entries if e["step"] != step] + [{"step": step, "files": files}]
    output.put_bytes(output_layout.VALIDATION_INDEX, json.dumps(entries, indent=1).encode())
    output.put_bytes(output_layout.INDEX_HTML, render_index(entries, title, weights).encode(), content_type="text/html; charset=utf-8")




class Validator:
    """Hooks.validate for the training loop; holds the encoded validation inputs between steps."""

    def __init__(self) -> None:
        self.samples: list[PreparedSample] | None = None
        self.negative: TextStates | None = None
        self.vae = None
        self.settings = SamplerSettings()  # the spec's sampler, set by prepare
        self.every_rank = False
        self.uploads = True
        self.compile_reported = False
        self.distillation: official_lora.OfficialLora = {}  # the cfg-step LoRA under sampler distilled

    def prepare(self, info: StepInfo) -> None:
        spec, world = info.job.spec, info.world
        height, width = (int(v) for v in spec.validation.resolution.split("x"))
        chosen = list(enumerate(choose_samples(spec, read_manifest(info.output))))
        if not chosen:
            log.warning("validation: the manifest has no samples to validate with; no videos will be made")
        # Under FSDP every forward is a collective over the shards: each rank runs every sample, rank 0 uploads.
        self.every_rank = spec.training.parallelism == "fsdp" and world.world_size > 1
        mine = chosen if self.every_rank else chosen[world.data_parallel_rank :: world.data_parallel_size]
        self.uploads = world.is_main if self.every_rank else world.context_rank == 0
        dtype = info.model.x_embedder.proj.weight.dtype
        # A split clip runs whole (context_parallel.py): the conditioning frame's cache would be one frame.
        self.settings = replace(settings_for(spec.validation, loading.load_scheduler(info.model_root).config.shift),
                                reuse_cond_kv=world.context_parallel == 1)
        if spec.validation.sampler == "distilled":
            self.distillation = official_lora.load(info.model_root, world.device, dtype)
        self.vae = loading.load_vae(info.model_root, dtype=torch.float32, device="cpu").eval()
        tokenizer = loading.load_tokenizer(info.model_root)
        text_encoder = loading.load_text_encoder(info.model_root, dtype=dtype, device=world.device)
        stores: dict[str, ObjectStore] = {}

        def store(dataset_id: str) -> ObjectStore:
            if dataset_id not in stores:
                stores[dataset_id] = store_for(spec.dataset(dataset_id).source, what=f"dataset '{dataset_id}'")
            return stores[dataset_id]

        def text(prompt: str) -> TextStates:
            states, mask = encode.encode_prompts(tokenizer, text_encoder, [prompt])
            return states.float().cpu(), mask.cpu()

        self.samples = []
        self.vae.to(world.device)
        for index, (dataset_id, sample) in mine:
            dataset = spec.dataset(dataset_id)
            conditioning_id = dataset.conditioning_data[0]
            start_key = sample.start_frames[conditioning_id].key
            raw = io.BytesIO(store(conditioning_id).get_bytes(start_key))
            start = load_start_frame(raw, f"{conditioning_id}/{start_key}", height, width)
            caption = store(dataset_id).get_bytes(sample.caption.key).decode("utf-8", "replace") if sample.caption else ""
            latents = encode.encode_video_latents(self.vae, start.to(world.device)).float().cpu()
            inputs = self.copy_inputs(info.output, index, sample.stem, {"start": (store(conditioning_id), start_key),
                                                                        "clip": (store(dataset_id), sample.clip.key)})
            self.samples.append(PreparedSample(index, f"{dataset_id}/{sample.stem}", caption.strip(),
                                               clip_fps(store(dataset_id), sample.clip.key), latents, text(caption),
                                               inputs))
        self.negative = text(spec.validation.negative_prompt) if self.settings.guidance > 1 else None
        self.vae.to("cpu")
        text_encoder = None  # `text` holds it in its closure: clearing it there frees the encoder's memory
        free_memory(world.device)

    def copy_inputs(self, output: ObjectStore, index: int, stem: str,
                    sources: dict[str, tuple[ObjectStore, str]]) -> dict[str, str]:
        """Copy the sample's start frame and source clip beside the videos: the datasets may sit in another
        bucket, and the report must open with no credentials for them."""
        keys = {}
        for role, (source, key) in sources.items():
            keys[role] = f"{output_layout.VALIDATION_INPUTS}/{index:02d}-{stem}-{role}{PurePosixPath(key).suffix}"
            if self.uploads:
                output.put_bytes(keys[role], source.get_bytes(key), content_type=mimetypes.guess_type(key)[0])
        return keys

    def __call__(self, info: StepInfo) -> list[str]:
        started = time.monotonic()
        dit, world = info.model, info.world
        was_training = dit.training
        dit.eval()
        try:
            with torch.no_grad():
                if self.samples is None:
                    self.prepare(info)
                with official_lora.active(dit, self.distillation):
                    mine = [self.run_one(info, s) for s in self.samples]
        finally:
            dit.train(was_training)
            if self.vae is not None:
                self.vae.to("cpu")
            free_memory(world.device)
        gathered = {f["index"]: f for rank_files in distributed.gather_objects(mine) for f in rank_files}
        files = [gathered[index] for index in sorted(gathered)]
        if world.is_main and files:
            update_index(info.output, info.step, files, f"{info.job.metadata.name or 'job'}: validation",
                         weights_shown(info.job.spec.training.ema))
        log.info("validation at step %d: %d videos (%s sampler, %d steps, guidance %s) in %.1fs", info.step,
                 len(files), self.settings.sampler, self.settings.steps, self.settings.guidance,
                 time.monotonic() - started)
        return [uri(info.output, f["mp4"]) for f in files]

    def run_one(self, info: StepInfo, sample: PreparedSample) -> dict:
        spec, device = info.job.spec.validation, info.world.device
        _, channels, _, h, w = sample.start_latents.shape
        noise = initial_noise((1, channels, latent_frames(spec.frames) - 1, h, w), spec.seed + sample.index)
        negative = None if self.negative is None else tuple(t.to(device) for t in self.negative)
        text = tuple(t.to(device) for t in sample.text)
        # The first video's first step compiles the sampler's graph (eval, no grad): reported once.
        on_step = report_first_step("validation") if not self.compile_reported else (lambda step: None)
        self.compile_reported = True
        latents = sample_latents(info.model, sample.start_latents.to(device), text, negative, noise, self.settings,
                                 on_step=on_step)
        self.vae.to(device)
        frames = to_uint8_frames(encode.decode_latents(self.vae, latents))
        stem = f"{output_layout.validation_step(info.step)}/{sample.index:02d}-{PurePosixPath(sample.name).name}"
        if self.uploads:
            info.output.put_bytes(f"{stem}.mp4", media.mp4_bytes(frames, sample.fps), content_type="video/mp4")
            sheet = media.contact_sheet_png(frames, caption=sample.prompt, step=info.step)
            info.output.put_bytes(f"{stem}.png", sheet, content_type="image/png")
        return {"index": sample.index, "name": sample.name, "prompt": sample.prompt, "mp4": f"{stem}.mp4",
                "png": f"{stem}.png", **sample.inputs}


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
