"""The trainer's reader: shards, verified downloads into a bounded cache, retries, changed data refused."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from longcat_job.api import JobSpec
from longcat_job.sample_manifest import Manifest, build_manifest
from longcat_job.storage import LocalStore, ObjectStore
from longcat_trainer.data.shards import DiskCache, ReadError, ShardReader, shard
from tests.datasets import IMAGE, job, local_place, preflight, s3_place
from tests.fixtures.s3 import S3Server


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_cover_everything_with_equal_lengths(world_size: int) -> None:
    items = list(range(10))
    shards = [shard(items, rank, world_size, seed=7, epoch=0) for rank in range(world_size)]
    assert len({len(s) for s in shards}) == 1
    assert set().union(*shards) == set(items)
    assert sum(len(s) for s in shards) - len(items) < world_size  # padding only to even out
    assert shard(items, 0, world_size, seed=7, epoch=0) == shards[0]  # every rank computes the same split


def test_each_epoch_has_its_own_order() -> None:
    items = list(range(10))
    assert shard(items, 0, 1, seed=7, epoch=0) != shard(items, 0, 1, seed=7, epoch=1)
    assert sorted(shard(items, 0, 1, seed=7, epoch=1)) == items


def _dataset(n: int) -> dict[str, dict[str, bytes]]:
    train = {f"c{i:02d}.mp4": f"clip {i} ".encode() * 100 for i in range(n)}
    train |= {f"c{i:02d}.txt": f"caption {i}".encode() for i in range(n)}
    return {"train": train, "frames": {f"c{i:02d}.png": IMAGE + bytes([i]) for i in range(n)}}


def _setup(server: S3Server | None, tmp_path: Path, n: int = 6) -> tuple[JobSpec, Manifest, dict[str, ObjectStore]]:
    place = s3_place(server) if server else local_place(tmp_path / "data")
    spec = job(place.datasets(_dataset(n)))
    result = preflight(server, spec)
    assert result.report.ok
    return spec, build_manifest("job", spec, result), result.stores


def _reader(manifest: Manifest, stores: dict[str, ObjectStore], cache: DiskCache, **kw) -> ShardReader:
    return ShardReader(manifest, "train", store_for=stores.__getitem__, cache=cache, **{"backoff_s": 0.05, **kw})


@pytest.mark.s3
@pytest.mark.parametrize("where", ["s3", "local"])
def test_ranks_read_disjoint_verified_samples(where: str, s3_server: S3Server, tmp_path: Path) -> None:
    _, manifest, stores = _setup(s3_server if where == "s3" else None, tmp_path)
    seen = []
    for rank in range(2):
        cache = DiskCache(tmp_path / f"cache{rank}", max_bytes=1 << 20)
        for sample in _reader(manifest, stores, cache, rank=rank, world_size=2).epoch(0):
            i = int(sample.stem[1:])
            assert sample.clip.read_bytes() == f"clip {i} ".encode() * 100
            assert sample.caption == f"caption {i}"
            assert sample.start_frames["frames"].read_bytes() == IMAGE + bytes([i])
            seen.append(sample.stem)
    assert sorted(seen) == [f"c{i:02d}" for i in range(6)]


@pytest.mark.s3
def test_corrupt_cached_file_is_downloaded_again(s3_server: S3Server, tmp_path: Path) -> None:
    _, manifest, stores = _setup(s3_server, tmp_path, n=2)
    cache = DiskCache(tmp_path / "cache", max_bytes=1 << 20)
    reader = _reader(manifest, stores, cache, rank=0, world_size=1)
    [first, _] = list(reader.epoch(0))
    original = first.clip.read_bytes()
    first.clip.write_bytes(original[:-3] + b"XXX")  # same size, other bytes
    again = {s.stem: s for s in reader.epoch(0)}
    assert again[first.stem].clip.read_bytes() == original
    # A fresh cache object over the same directory adopts the verified files.
    assert DiskCache(tmp_path / "cache", max_bytes=1 << 20).used_bytes == cache.used_bytes > 0


@pytest.mark.s3
@pytest.mark.parametrize("where", ["s3", "local"])
def test_object_changed_after_freezing_is_refused(where: str, s3_server: S3Server, tmp_path: Path) -> None:
    _, manifest, stores = _setup(s3_server if where == "s3" else None, tmp_path, n=2)
    if where == "s3":
        store = stores["train"]
        s3_server.client().put_object(Bucket=store.bucket, Key=store.prefix + "c01.mp4", Body=b"replaced")
    else:
        (tmp_path / "data" / "train" / "c01.mp4").write_bytes(b"replaced")
    reader = _reader(manifest, stores, DiskCache(tmp_path / "cache", max_bytes=1 << 20), rank=0, world_size=1)
    with pytest.raises(ReadError, match=r"dataset 'train': .*c01\.mp4 changed after the manifest was frozen"):
        list(reader.epoch(0))


def _bytes_on_disk(directory: Path) -> int:
    total = 0
    for path in directory.iterdir():
        try:
            total += 0 if path.name.endswith(".md5") else path.stat().st_size
        except FileNotFoundError:  # evicted or renamed by a download thread meanwhile
            pass
    return total


@pytest.mark.s3
def test_cache_stays_within_its_bound(s3_server: S3Server, tmp_path: Path) -> None:
    _, manifest, stores = _setup(s3_server, tmp_path, n=12)
    one_sample = sum(o.size for o in (manifest.datasets[0].samples[0].clip, manifest.datasets[0].samples[0].caption,
                                      manifest.datasets[0].samples[0].start_frames["frames"]))
    bound = one_sample * 3 + 100  # room for the sample in use and one prefetched, plus slack
    cache = DiskCache(tmp_path / "cache", max_bytes=bound)
    peak = 0
    stems = []
    for sample in _reader(manifest, stores, cache, rank=0, world_size=1, prefetch=1).epoch(0):
        peak = max(peak, _bytes_on_disk(tmp_path / "cache"))
        stems.append(sample.stem)
    assert len(stems) == 12 and peak <= bound
    too_small = DiskCache(tmp_path / "tiny", max_bytes=10)
    with pytest.raises(ReadError, match=r"larger than the whole cache"):
        list(_reader(manifest, stores, too_small, rank=0, world_size=1).epoch(0))


def test_downloads_in_flight_count_against_the_bound(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache", max_bytes=1000)
    first, second, third = (tmp_path / "cache" / name for name in ("a", "b", "c"))
    for path in (first, second):
        cache.pin(path)
    cache.reserve(first, 600, "a")  # downloading, nothing on disk yet
    with pytest.raises(ReadError, match=r"full of files in use; raise the cache size or lower prefetch"):
        cache.reserve(second, 600, "b")
    cache.remove(second)
    first.write_bytes(bytes(600))
    cache.commit(first, "md5", 600)
    cache.unpin(first)
    cache.reserve(second, 600, "b")  # evicts the committed, no longer pinned file
    assert not first.exists() and cache.used_bytes == 600
    cache.reserve(third, 400, "c")
    assert cache.used_bytes == 1000


@pytest.mark.parametrize("fails", ["before", "after"])
def test_a_failed_download_leaves_the_copy_another_thread_commits(fails: str, tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "cache", max_bytes=1000)
    shared = tmp_path / "cache" / "frame"
    for _ in range(2):  # two samples with the same start frame download it at once; one download fails
        cache.pin(shared)
        cache.reserve(shared, 600, "frame")
    if fails == "before":
        cache.abandon(shared)
    shared.write_bytes(bytes(600))
    cache.commit(shared, "md5", 600)
    if fails == "after":
        cache.abandon(shared)
    assert shared.is_file() and cache.used_bytes == 600
    lone = tmp_path / "cache" / "lone"
    cache.reserve(lone, 300, "lone")
    cache.abandon(lone)
    assert cache.used_bytes == 600


@pytest.mark.s3
def test_download_survives_the_server_going_away_and_back(s3_server_private: S3Server, tmp_path: Path) -> None:
    server = s3_server_private
    _, manifest, stores = _setup(server, tmp_path, n=2)
    server.stop()
    restart = threading.Timer(1.0, server.start)
    restart.start()
    try:
        cache = DiskCache(tmp_path / "cache", max_bytes=1 << 20)
        # Retries for up to a minute: the restart itself takes a second or more on a loaded machine.
        reader = _reader(manifest, stores, cache, rank=0, world_size=1, attempts=8, backoff_s=0.25)
        samples = list(reader.epoch(0))
    finally:
        restart.join()
    assert sorted(s.stem for s in samples) == ["c00", "c01"]


def test_a_dataset_moved_since_the_manifest_is_refused(tmp_path: Path) -> None:
    _, manifest, stores = _setup(None, tmp_path, n=1)
    moved = {**stores, "frames": LocalStore(tmp_path / "elsewhere")}
    with pytest.raises(ReadError, match=r"dataset 'frames': the manifest froze .* but the job now reads"):
        _reader(manifest, moved, DiskCache(tmp_path / "cache", max_bytes=1 << 20), rank=0, world_size=1)
