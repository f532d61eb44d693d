"""Epoch order and bucketing of training batches: the same on every rank, one bucket per batch."""

from __future__ import annotations

from longcat_trainer.cache import Ref, TrainSample
from longcat_trainer.data.batches import epoch_batches
from longcat_trainer.data.reader import shard
from longcat_trainer.data.video import Bucket


def samples(n: int) -> list[TrainSample]:
    buckets = [Bucket(448, 832), Bucket(832, 448)]
    return [
        TrainSample(f"clips/{i}", Ref("c", f"{i}"), Ref("f", f"{i}"), Ref("c", f"t{i}"), buckets[i % 3 == 0])
        for i in range(n)
    ]


def test_batches_hold_one_bucket_and_repeat_per_seed_and_epoch() -> None:
    data = samples(12)  # 4 portrait, 8 landscape
    batches = epoch_batches(data, 3, seed=5, epoch=0)
    assert all(len(b) == 3 and len({s.bucket for s in b}) == 1 for b in batches)
    assert len(batches) == 1 + 2  # the incomplete batch of each bucket is dropped
    assert epoch_batches(data, 3, seed=5, epoch=0) == batches
    assert epoch_batches(data, 3, seed=5, epoch=1) != batches
    ranks = [shard(batches, r, 2, seed=5, epoch=0) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # padded by wrapping: no rank waits for another in all-reduce
    assert {s.name for b in ranks[0] + ranks[1] for s in b} == {s.name for b in batches for s in b}
