"""Epoch order and bucketing of training batches: the same on every rank, one bucket per batch."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from longcat_job.buckets import Bucket
from longcat_job.storage import LocalStore
from longcat_trainer.data.batches import BatchStream, DeviceBatches, epoch_batches
from longcat_trainer.data.entries import Layout, Ref, TrainSample
from longcat_trainer.data.shards import shard


def samples(n: int) -> list[TrainSample]:
    layouts = [Layout(Bucket(448, 832), 9), Layout(Bucket(832, 448), 9)]
    return [
        TrainSample(f"clips/{i}", Ref("c", f"{i}"), Ref("f", f"{i}"), Ref("c", f"t{i}"), layouts[i % 3 == 0])
        for i in range(n)
    ]


def test_batches_hold_one_bucket_and_repeat_per_seed_and_epoch() -> None:
    data = samples(12)  # 4 portrait, 8 landscape
    batches = epoch_batches(data, 3, seed=5, epoch=0)
    assert all(len(b) == 3 and len({s.layout for s in b}) == 1 for b in batches)
    assert len(batches) == 1 + 2  # the incomplete batch of each bucket is dropped
    assert epoch_batches(data, 3, seed=5, epoch=0) == batches
    assert epoch_batches(data, 3, seed=5, epoch=1) != batches
    ranks = [shard(batches, r, 2, seed=5, epoch=0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # padded by wrapping: no rank waits for another in all-reduce
    assert {s.name for b in ranks[0] + ranks[1] for s in b} == {s.name for b in batches for s in b}


def stored(data: list[TrainSample], root: Path) -> dict[str, LocalStore]:
    """Distinct latents and caption states for every sample, where its refs point."""
    stores = {"c": LocalStore(root / "c"), "f": LocalStore(root / "f")}
    for i, sample in enumerate(data):
        stores["c"].put_bytes(sample.clip.key, save_safetensors({"latents": torch.full((2, 3, 4, 4), float(i))}))
        stores["f"].put_bytes(sample.start.key, save_safetensors({"latents": torch.full((2, 1, 4, 4), -float(i))}))
        stores["c"].put_bytes(sample.text.key, save_safetensors({"states": torch.full((1 + i % 3, 4), float(i))}))
    return stores


def test_device_batches_on_the_cpu_are_the_streams_batches_and_positions(tmp_path: Path) -> None:
    data = samples(12)
    stores = stored(data, tmp_path)

    def stream() -> BatchStream:
        return BatchStream(data, stores, batch_size=3, seed=5, rank=1, world_size=2, epoch=0, index=1)

    plain, wrapped = stream(), DeviceBatches(stream(), torch.device("cpu"))
    try:
        assert wrapped.position() == plain.position() == {"epoch": 0, "index": 1}
        for _ in range(5):  # past the end of epoch 0 (2 batches on this rank)
            expected, got = plain.next(), wrapped.next()
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[k], expected[k]) for k in expected)
            assert wrapped.position() == plain.position()
        assert wrapped.position()["epoch"] == 2
        assert wrapped.wait_seconds == wrapped.stream.wait_seconds
    finally:
        plain.close()
        wrapped.close()
