"""Training batches from the caches: the same epoch order on every rank, each rank its share, read ahead.

The data position is (epoch, index of this rank's next batch); saved in checkpoints, so a resumed job
continues with exactly the batch it would have trained on next. On CUDA, DeviceBatches copies the next
batch to the GPU while the current one trains.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from longcat_job.failures import InvalidConfigError
from longcat_job.storage import ObjectStore

from .entries import Layout, TrainSample, read_entry, text_batch
from .shards import shard


def epoch_batches(samples: list[TrainSample], batch_size: int, seed: int, epoch: int) -> list[list[TrainSample]]:
    """One epoch's batches, the same on every rank: a seeded shuffle, then batches of one layout (frame size
    bucket and frame count) each.

    A layout's last incomplete batch of the epoch is dropped (its samples come in other epochs' batches).
    """
    order = list(samples)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    by_layout: dict[Layout, list[TrainSample]] = {}
    batches = []
    for sample in order:
        group = by_layout.setdefault(sample.layout, [])
        group.append(sample)
        if len(group) == batch_size:
            batches.append(list(group))
            group.clear()
    return batches


def load_batch(batch: list[TrainSample], stores: dict[str, ObjectStore]) -> dict[str, torch.Tensor]:
    """Clip latents [B, C, T, H, W], start-frame latents [B, C, 1, H, W], caption states and mask, and each
    sample's caption dropout probability [B]."""
    clips, starts, texts = [], [], []
    for sample in batch:
        clips.append(read_entry(stores[sample.clip.store], sample.clip.key)["latents"])
        starts.append(read_entry(stores[sample.start.store], sample.start.key)["latents"])
        texts.append(read_entry(stores[sample.text.store], sample.text.key))
    states, mask = text_batch(texts)
    return {"clip": torch.stack(clips), "start": torch.stack(starts), "text": states, "text_mask": mask,
            "caption_dropout": torch.tensor([s.caption_dropout for s in batch])}


class BatchStream:
    """This rank's batches, epoch after epoch, from a saved position; the next batches load in a thread."""

    AHEAD = 2

    def __init__(
        self, samples: list[TrainSample], stores: dict[str, ObjectStore], *, batch_size: int, seed: int,
        rank: int, world_size: int, epoch: int = 0, index: int = 0,
    ) -> None:
        self.samples, self.stores = samples, stores
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.index = epoch, index  # position of the next batch handed out
        self.wait_seconds = 0.0
        if not epoch_batches(samples, batch_size, seed, 0):
            raise InvalidConfigError(
                f"no bucket (frame size and frame count) holds {batch_size} samples: lower spec.training.batchSize or add "
                "clips of the same shape and length"
            )
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="batches")
        self._ahead: list[tuple[int, int, Future[dict[str, torch.Tensor]]]] = []
        self._positions = self._walk(epoch, index)

    def _walk(self, epoch: int, index: int) -> Iterator[tuple[int, int, list[TrainSample]]]:
        while True:
            mine = shard(epoch_batches(self.samples, self.batch_size, self.seed, epoch), self.rank, self.world_size,
                         seed=self.seed, epoch=epoch)
            for i in range(index, len(mine)):
                yield epoch, i, mine[i]
            epoch, index = epoch + 1, 0

    def next(self) -> dict[str, torch.Tensor]:
        while len(self._ahead) < self.AHEAD:
            epoch, index, batch = next(self._positions)
            self._ahead.append((epoch, index, self._pool.submit(load_batch, batch, self.stores)))
        epoch, index, future = self._ahead.pop(0)
        started = time.monotonic()
        batch = future.result()
        self.wait_seconds += time.monotonic() - started
        self.epoch, self.index = epoch, index + 1
        return batch

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; to CUDA through pinned memory, so the copy does not block the host."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)  # pin_memory() keeps an already pinned tensor


class DeviceBatches:
    """A BatchStream's batches on `device`. On CUDA the next batch is copied on a side stream as soon as the
    current one is handed out, so the copy overlaps the current step's compute; on the CPU it is the stream.

    position() is that of the batches handed out: a prefetched batch is not trained on yet, so a checkpoint
    must not count it.
    """

    def __init__(self, stream: BatchStream, device: torch.device) -> None:
        self.stream, self.device = stream, device
        self._copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._ahead: tuple[dict[str, torch.Tensor], torch.cuda.Event, dict[str, int]] | None = None
        self._position = stream.position()

    @property
    def wait_seconds(self) -> float:
        return self.stream.wait_seconds

    def next(self) -> dict[str, torch.Tensor]:
        if self._copies is None:
            batch = self.stream.next()
            self._position = self.stream.position()
            return batch
        batch, copied, self._position = self._ahead or self._copy()
        self._ahead = self._copy()
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(copied)
        for tensor in batch.values():
            # Allocated on the copy stream: keep the allocator from reusing it there before the compute is done.
            tensor.record_stream(compute)
        return batch

    def _copy(self) -> tuple[dict[str, torch.Tensor], torch.cuda.Event, dict[str, int]]:
        """The stream's next batch, its copy to the device queued on the side stream, and the position after it."""
        batch = self.stream.next()
        with torch.cuda.stream(self._copies):
            on_device = {k: to_device(v, self.device) for k, v in batch.items()}
        copied = torch.cuda.Event()
        copied.record(self._copies)
        return on_device, copied, self.stream.position()

    def position(self) -> dict[str, int]:
        return dict(self._position)

    def close(self) -> None:
        self._ahead = None
        self.stream.close()
