"""The training job: frozen manifest -> caches -> LoRA flow-matching steps -> checkpoints and a LoRA in the output.

Every rank runs this; rank 0 alone writes the output (the caches are written by whichever rank encodes):

    <output>/manifest.json       the frozen samples (the operator's preflight, or rank 0 here when absent)
    <output>/progress.json       phase, step, loss, rate, ETA, cache hits, bad samples, artifacts
    <output>/checkpoints/        see checkpoint.py
    <output>/lora/               the final LoRA in spec.lora.formats (lora.py); lora/ema/ the same of the EMA
    <output>/loss.png            the loss curve
    <output>/cache/<dataset>/    latents and text embeddings, unless the dataset names a vaeCache (see cache/)

Validation (`Hooks.validate`) runs every `validation.everySteps` steps and at the end, on the EMA weights when
`training.ema` is on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.optimization import get_scheduler

from longcat_job.api import LongCatI2VJob
from longcat_job.failures import BadInputError, Preempted, classify
from longcat_job import output_layout
from longcat_job.loss_history import LossHistory
from longcat_job.lora_files import FORMAT_FILES
from longcat_job.preflight import run_preflight
from longcat_job.progress import BadSamples, CacheCounts
from longcat_job.sample_manifest import (
    MANIFEST_KEY,
    Manifest,
    build_manifest,
    read_manifest,
    write_manifest,
)
from longcat_job.storage import ObjectStore, store_for

from . import caption_dropout, checkpoint, distributed, flow, lora
from .cache.build import CacheResult, build_caches
from .cache.plan import cache_location
from .data.batches import BatchStream, DeviceBatches, to_device
from .data.entries import read_entry, text_batch
from .data.shards import DiskCache, ShardReader
from .distributed import World
from .ema import AdapterEMA
from .initial_lora import initial_lora_state
from .metrics import DEFAULT_METRICS_PORT, METRICS_PORT_ENV, RateLog, TrainerMetrics
from .model.loading import load_dit
from .model.prepare import prepare_for_training
from .model.sources import resolve_model_source
from .report import Reporter, uri, write_loss

log = logging.getLogger(__name__)

DATA_CACHE_ENV = "LONGCAT_DATA_CACHE"
DATA_CACHE_BYTES = 20 << 30


@dataclass
class StepInfo:
    """What a hook sees: the step just finished and the model being trained (unwrapped, LoRA active)."""

    step: int
    model: torch.nn.Module
    world: World
    job: LongCatI2VJob
    model_root: Path
    output: ObjectStore
    cache: CacheResult
    cache_stores: dict[str, ObjectStore]


@dataclass
class Hooks:
    # Validation sampling (every validation.everySteps and at the end, on every rank); returns the URIs of
    # the videos it uploaded, which go into progress.json's artifacts.
    validate: Callable[[StepInfo], list[str]] | None = None
    after_step: Callable[[StepInfo], None] | None = None


def frozen_manifest(job: LongCatI2VJob, output: ObjectStore, world: World) -> Manifest:
    """The operator's manifest.json; without one (one machine, tests) rank 0 runs preflight and writes it."""
    if world.is_main and not any(r.key == MANIFEST_KEY for r in _list_or_empty(output)):
        result = run_preflight(job.spec)
        level = logging.WARNING if result.report.unusable or not result.report.ok else logging.INFO
        for line in result.report.lines():
            log.log(level, "preflight: %s", line)
        if not result.report.ok:
            raise BadInputError("preflight found problems:\n" + "\n".join(result.report.lines()))
        write_manifest(output, build_manifest(job.metadata.name or "job", job.spec, result))
    distributed.barrier()
    return read_manifest(output)


def _list_or_empty(store: ObjectStore) -> list:
    try:
        return list(store.list())
    except FileNotFoundError:
        return []


def run(job: LongCatI2VJob, hooks: Hooks | None = None) -> None:
    """Train the job; records a failure in progress.json before re-raising it."""
    world = distributed.init_world(job.spec.training.context_parallel)
    output = store_for(job.spec.output, what="output (spec.output)")
    reporter = Reporter(output, enabled=world.is_main, world_size=world.world_size)
    try:
        _train(job, hooks or Hooks(), world, output, reporter)
    except Preempted:
        raise
    except Exception as exc:
        outcome = classify(exc)
        reporter.fail(outcome.reason, outcome.message)
        raise
    finally:
        distributed.shutdown()


def _train(job: LongCatI2VJob, hooks: Hooks, world: World, output: ObjectStore, reporter: Reporter) -> None:
    spec, train_spec = job.spec, job.spec.training
    metrics = TrainerMetrics(job.metadata.name or "job")
    if world.is_local_main:
        metrics.serve(int(os.environ.get(METRICS_PORT_ENV, DEFAULT_METRICS_PORT)))
    metrics.max_steps.set(train_spec.max_steps)
    manifest = frozen_manifest(job, output, world)
    if world.is_main:  # the UI's preview finds the model and the sizes here, without the job file
        output.put_bytes(output_layout.JOB, job.model_dump_json(by_alias=True, exclude_none=True).encode(),
                         content_type="application/json")
    model_root = resolve_model_source(spec.model.source, storage=spec.model.storage)
    dtype = torch.bfloat16 if world.device.type == "cuda" and train_spec.precision == "bf16" else torch.float32

    reporter.phase("Caching")
    cache, cache_stores = prepare_caches(job, manifest, world, model_root, dtype, reporter, metrics)
    reporter.doc.artifacts.manifest = uri(output, MANIFEST_KEY)
    if hooks.validate is not None:
        reporter.doc.artifacts.report = uri(output, output_layout.INDEX_HTML)

    # With offload the blocks' weights live in host memory (model/offload.py): a card smaller than the model
    # never holds all of them, so the model loads on the CPU and only what stays on the card moves there.
    dit = load_dit(model_root, dtype=dtype, device="cpu" if train_spec.offload == "blocks" else world.device)
    state = checkpoint.load_latest(output)
    if state is not None:
        start = state["lora"]
    else:
        start = initial_lora_state(spec.lora, dit) if spec.lora.init_from is not None else None
    model = prepare_for_training(dit, spec, world, lora_state=start)
    run = TrainingRun(job, world, dit, model, dtype, output, reporter, metrics, cache, cache_stores, hooks,
                      model_root)
    if state is not None:
        run.restore(state)
    run.loop()
    run.finish()


def prepare_caches(
    job: LongCatI2VJob, manifest: Manifest, world: World, model_root: Path, dtype: torch.dtype,
    reporter: Reporter, metrics: TrainerMetrics,
) -> tuple[CacheResult, dict[str, ObjectStore]]:
    """Fill the caches (all ranks), report what was found, and refuse data with too many unusable samples."""
    spec = job.spec
    dataset_stores = {d.id: store_for(d.source, what=f"dataset '{d.id}'") for d in spec.datasets}
    cache_stores = {d.id: store_for(cache_location(spec, d), what=f"cache of dataset '{d.id}'") for d in spec.datasets}
    data_dir = Path(os.environ.get(DATA_CACHE_ENV) or tempfile.gettempdir()) / f"longcat-data-{world.rank}"
    reader = ShardReader(manifest, "train", rank=world.rank, world_size=world.world_size,
                         store_for=dataset_stores.__getitem__, cache=DiskCache(data_dir, DATA_CACHE_BYTES))
    cache = build_caches(spec, manifest, world, reader, cache_stores, model_root, dtype)
    # Preflight left some samples out already (within maxBadSampleFraction); they count with what caching found.
    named = manifest.excluded("train") + cache.bad
    total = cache.total + len(manifest.excluded("train"))
    unusable = total - len(cache.samples)
    metrics.cache_hits.inc(cache.hits)
    metrics.cache_misses.inc(cache.misses)
    metrics.bad_samples.set(unusable)
    reporter.doc.cache = CacheCounts(hits=cache.hits, misses=cache.misses)
    reporter.doc.bad_samples = BadSamples(count=unusable, total=total, too_short=cache.too_short,
                                          examples=named[:20])
    log.info("cache: %d hits, %d misses, %d bad (%d too short), %d left out by preflight, %d of %d samples usable",
             cache.hits, cache.misses, len(cache.bad), cache.too_short, total - cache.total, len(cache.samples),
             total)
    fraction = spec.training.max_bad_sample_fraction
    if not cache.samples or unusable > fraction * total:
        raise BadInputError(
            f"{unusable} of {total} samples are unusable, more than spec.training.maxBadSampleFraction={fraction}; "
            "first: " + "; ".join(named[:5])
        )
    return cache, cache_stores


def resumed_position(state: dict[str, Any], data_parallel: int) -> dict[str, int]:
    """The checkpoint's data position for `data_parallel` groups: the same number of batches consumed in all.

    Checkpoints before context parallelism did not record their groups: every rank was one (one RNG state each).
    """
    data = state["data"]
    saved = data.get("data_parallel", len(state["rng"]))
    return {"epoch": data["epoch"], "index": data["index"] * saved // data_parallel}


class TrainingRun:
    """The state that changes while training (one explicit checkpoint dict) and the steps that change it."""

    def __init__(
        self, job: LongCatI2VJob, world: World, dit: torch.nn.Module, model: torch.nn.Module, dtype: torch.dtype,
        output: ObjectStore, reporter: Reporter, metrics: TrainerMetrics, cache: CacheResult,
        cache_stores: dict[str, ObjectStore], hooks: Hooks, model_root: Path,
    ) -> None:
        self.job, self.spec, self.train = job, job.spec, job.spec.training
        self.world, self.dit, self.model, self.dtype = world, dit, model, dtype
        self.output, self.reporter, self.metrics, self.hooks = output, reporter, metrics, hooks
        self.cache, self.cache_stores, self.model_root = cache, cache_stores, model_root
        # Made after wrapping: FSDP replaces the parameters with shards.
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.train.learning_rate, weight_decay=self.train.weight_decay
        )
        self.scheduler = get_scheduler(
            self.train.lr_scheduler, self.optimizer,
            num_warmup_steps=self.train.warmup_steps, num_training_steps=self.train.max_steps,
        )
        self.step, self.history = 0, []
        self.stream = self._stream(epoch=0, index=0)
        self.empty_prompt = self._empty_prompt() if any(s.caption_dropout for s in cache.samples) else None
        self.ema = AdapterEMA(dit, self.train.ema, world.device) if self.train.ema is not None else None

    def _empty_prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's text states and mask on the device: what a dropped caption trains on."""
        states, mask = text_batch([read_entry(self.cache_stores[self.cache.negative.store], self.cache.negative.key)])
        return states.to(self.world.device), mask.to(self.world.device)

    def _stream(self, epoch: int, index: int) -> DeviceBatches:
        """Batches of this rank's data-parallel group: every rank of a context-parallel group gets the same."""
        stream = BatchStream(self.cache.samples, self.cache_stores, batch_size=self.train.batch_size,
                             seed=self.train.seed, rank=self.world.data_parallel_rank,
                             world_size=self.world.data_parallel_size, epoch=epoch, index=index)
        return DeviceBatches(stream, self.world.device)

    def state(self) -> dict[str, Any]:
        """Everything a resumed run needs (a collective under FSDP); RNG states of every rank."""
        return {
            "lora": lora.lora_state(self.dit),
            "optimizer": distributed.optimizer_state(self.dit, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "data": {**self.stream.position(), "data_parallel": self.world.data_parallel_size},
            "loss_history": self.history,
            "rng": distributed.gather_objects(checkpoint.rng_state()),
            **({"ema": self.ema.state()} if self.ema is not None else {}),
        }

    def restore(self, state: dict[str, Any]) -> None:
        distributed.load_optimizer_state(self.dit, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # Checkpoints written before the learning rate was kept hold (step, loss) pairs.
        self.step = state["step"]
        self.history = [(row[0], row[1], row[2] if len(row) > 2 else None) for row in state["loss_history"]]
        self.stream.close()
        self.stream = self._stream(**resumed_position(state, self.world.data_parallel_size))
        if len(state["rng"]) == self.world.world_size:
            checkpoint.restore_rng(state["rng"][self.world.rank])
        else:
            log.warning("checkpoint has %d ranks' RNG states, this run %d: dropout streams start afresh",
                        len(state["rng"]), self.world.world_size)
        if self.ema is not None and "ema" in state:
            self.ema.load(state["ema"])
        elif self.ema is not None:
            log.warning("the checkpoint has no EMA (training.ema was off): the EMA starts from its weights")
        self.reporter.doc.artifacts.latest_checkpoint = uri(self.output, checkpoint.step_prefix(self.step))

    def save(self) -> None:
        started = time.monotonic()
        state = self.state()
        files = self.lora_files(state["lora"])  # every rank: a collective under FSDP
        if self.world.is_main:
            prefix = checkpoint.save(self.output, self.step, state, files, self.train.keep_checkpoints)
            artifacts = self.reporter.doc.artifacts
            artifacts.latest_checkpoint = uri(self.output, prefix)
            kept = artifacts.checkpoints + [artifacts.latest_checkpoint]
            artifacts.checkpoints = kept[-self.train.keep_checkpoints :]
            self.reporter.write(force=True)
            write_loss(self.output, LossHistory.of(self.history))
        distributed.barrier()
        self.metrics.checkpoint_seconds.observe(time.monotonic() - started)

    def lora_files(self, trained: dict[str, torch.Tensor]) -> dict[str, bytes]:
        """The LoRA files of the trained adapters, and of their EMA under ema/ when there is one."""
        files = lora.export_files(trained, self.spec.lora)
        if self.ema is not None:
            with self.ema.applied():
                average = lora.lora_state(self.dit)
            files |= {f"{output_layout.EMA}{name}": data for name, data in lora.export_files(average, self.spec.lora).items()}
        return files

    def info(self) -> StepInfo:
        return StepInfo(self.step, self.dit, self.world, self.job, self.model_root, self.output, self.cache,
                        self.cache_stores)

    def validate(self) -> None:
        if self.hooks.validate is not None:
            started = time.monotonic()
            self.dit.eval()
            with self.ema.applied() if self.ema is not None else contextlib.nullcontext():
                self.reporter.doc.artifacts.validation_videos += self.hooks.validate(self.info())
            self.dit.train()
            self.metrics.validation_seconds.observe(time.monotonic() - started)

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over gradient_accumulation micro-batches; returns (loss, latent tokens).

        The only host sync is the loss at the end: the losses add up on the device (in float64, as the
        Python floats did), and the noise is drawn on the CPU, per micro-batch slot, into pinned memory.
        """
        device, accumulation, world = self.world.device, self.train.gradient_accumulation, self.world
        loss_sum, tokens = torch.zeros((), dtype=torch.float64, device=device), 0
        for micro in range(accumulation):
            batch = self.stream.next()
            clip = batch["clip"]
            if self.empty_prompt is not None:
                # by data-parallel rank: the ranks of a context-parallel group train the same sample
                draws = caption_dropout.uniforms(self.train.seed, self.step, world.data_parallel_rank, micro,
                                                 clip.shape[0])
                batch = caption_dropout.drop_captions(batch, draws, *self.empty_prompt)
            slot = micro * world.data_parallel_size + world.data_parallel_rank
            sigma, noise = flow.slot_noise(self.train.seed, self.step, slot, clip.shape, self.train.flow_shift,
                                           pin_memory=device.type == "cuda")
            sigma, noise = to_device(sigma, device), to_device(noise, device)
            last = micro == accumulation - 1
            with contextlib.nullcontext() if last else distributed.accumulating(self.model):
                loss = flow.training_loss(self.model, clip, batch["start"], batch["text"], batch["text_mask"],
                                          sigma, noise, self.dtype) / accumulation
                loss.backward()
            loss_sum += loss.detach()
            tokens += clip[:, 0].numel() // 4  # one DiT token per 2x2 patch of each latent frame
        torch.nn.utils.clip_grad_norm_(self.params, self.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.step)
        return distributed.mean_across_ranks(loss_sum, device), tokens

    def loop(self) -> None:
        self.reporter.phase("Training")
        rate = RateLog("train", self.train.max_steps, " steps", done_before=self.step)
        every = self.spec.validation.every_steps
        self.dit.train()
        with checkpoint.Preemption() as preemption:
            while self.step < self.train.max_steps:
                started, waited = time.monotonic(), self.stream.wait_seconds
                loss, tokens = self.train_step()
                self.history.append((self.step, loss, self.scheduler.get_last_lr()[0]))
                self._observe(loss, tokens * self.world.data_parallel_size, time.monotonic() - started,
                              self.stream.wait_seconds - waited, rate)
                if self.hooks.after_step is not None:
                    self.hooks.after_step(self.info())
                preempted = distributed.any_rank(preemption.requested, self.world.device)
                if preempted or self.step % self.train.checkpoint_every == 0 or self.step == self.train.max_steps:
                    self.save()
                if preempted:
                    self.reporter.phase("Preempted")
                    raise Preempted(f"stopped at step {self.step} by a signal; checkpoint saved, run again to resume")
                if every and self.step % every == 0 and self.step < self.train.max_steps:
                    self.validate()
        self.stream.close()

    def _observe(self, loss: float, tokens: int, seconds: float, data_wait: float, rate: RateLog) -> None:
        samples = self.train.batch_size * self.train.gradient_accumulation * self.world.data_parallel_size
        lr = self.scheduler.get_last_lr()[0]
        m = self.metrics
        m.step.set(self.step)
        m.loss.set(loss)
        m.lr.set(lr)
        m.samples_per_second.set(samples / seconds)
        m.latent_tokens_per_second.set(tokens / seconds)
        m.data_wait.inc(data_wait)
        m.observe_gpu(self.world.device)
        progress = self.reporter.doc.progress
        progress.step, progress.max_steps = self.step, self.train.max_steps
        progress.step_display = f"{self.step}/{self.train.max_steps}"
        progress.loss, progress.learning_rate, progress.samples_per_second = loss, lr, samples / seconds
        progress.eta_seconds = round(rate.eta(self.step), 1)
        rate.update(self.step, f" loss {loss:.4f} lr {lr:.2e}")
        self.reporter.write()

    def finish(self) -> None:
        """Validation at the end, the final LoRA and the loss curve."""
        self.validate()
        files = self.lora_files(lora.lora_state(self.dit))  # every rank: a collective under FSDP
        if self.world.is_main:
            for name, data in files.items():
                self.output.put_bytes(f"{output_layout.LORA}{name}", data)
            write_loss(self.output, LossHistory.of(self.history))
            main = "peft" if "peft" in self.spec.lora.formats else self.spec.lora.formats[0]
            self.reporter.doc.artifacts.lora = uri(self.output, f"{output_layout.LORA}{FORMAT_FILES[main]}")
            log.info("LoRA written to %s", self.reporter.doc.artifacts.lora)
        self.reporter.phase("Succeeded")
        distributed.barrier()
