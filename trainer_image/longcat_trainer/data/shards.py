"""Each rank's share of the frozen manifest, downloaded ahead of use into a bounded local cache.

Downloads run in background threads a few samples ahead of the consumer. Every object is checked against
the manifest: S3 GETs carry If-Match with the frozen ETag (a changed object is refused by the server), the
size must match, and a single-part ETag (an MD5) must equal the MD5 of the bytes. A cached file is hashed
again before each use, so a corrupted cache is downloaded afresh instead of being trained on.
Torch-free: the decode stage turns the local paths into tensors.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from longcat_job.sample_manifest import Manifest, ManifestObject, ManifestSample, Split
from longcat_job.storage import ObjectChangedError, ObjectStore

log = logging.getLogger(__name__)

PREFETCH = 4
WORKERS = 4
ATTEMPTS = 4
BACKOFF_S = 0.5
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")
# Answers that another attempt cannot change.
_FINAL_CODES = {"NoSuchKey", "NoSuchBucket", "AccessDenied", "403", "404", "InvalidAccessKeyId", "SignatureDoesNotMatch"}

T = TypeVar("T")


class ReadError(Exception):
    """An object of the manifest could not be fetched or verified; the message names dataset and key."""


class VerifyError(Exception):
    pass


def shard(items: Sequence[T], rank: int, world_size: int, *, seed: int, epoch: int) -> list[T]:
    """This rank's items for an epoch: one seeded shuffle shared by all ranks, then every world_size-th item.

    The list is padded by wrapping so every rank gets the same count: DDP ranks that ran out of data first
    would wait forever in the next all-reduce.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if not items:
        return []
    order = list(range(len(items)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    per_rank = -(-len(order) // world_size)
    order += order[: per_rank * world_size - len(order)]
    return [items[i] for i in order[rank::world_size]]


@dataclass(frozen=True)
class LocalSample:
    dataset_id: str
    stem: str
    clip: Path
    caption: str | None
    start_frames: Mapping[str, Path]  # conditioning dataset id -> local file


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: Path) -> Path:
    """Where a cached file's MD5 is written once its download is verified."""
    return path.with_name(path.name + ".md5")


class DiskCache:
    """Files named by (location, key, ETag), least recently used evicted beyond `max_bytes`.

    Files in use or prefetched are pinned and never evicted. Each file has a `.md5` sidecar written after
    its download was verified; a file without one is an interrupted download and is ignored.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._sizes: OrderedDict[Path, int] = OrderedDict()  # least recently used first
        self._used = 0
        self._pins: dict[Path, int] = {}
        for sidecar in sorted(self.root.glob("*.md5"), key=lambda p: p.stat().st_mtime):
            data = sidecar.with_suffix("")
            if data.exists():
                self._add_locked(data, data.stat().st_size)

    @property
    def used_bytes(self) -> int:
        return self._used

    def path_for(self, location: str, obj: ManifestObject) -> Path:
        name = hashlib.sha256(f"{location}\0{obj.key}\0{obj.etag}".encode()).hexdigest()[:40]
        return self.root / name

    def pin(self, path: Path) -> None:
        with self._lock:
            self._pins[path] = self._pins.get(path, 0) + 1

    def unpin(self, path: Path) -> None:
        with self._lock:
            self._pins[path] -= 1
            if not self._pins[path]:
                del self._pins[path]

    def valid(self, path: Path, obj: ManifestObject) -> bool:
        sidecar = _sidecar(path)
        if not (path.exists() and sidecar.exists()):
            return False
        if path.stat().st_size == obj.size and _md5(path) == sidecar.read_text():
            with self._lock:
                self._add_locked(path, obj.size)
            return True
        log.warning("cached copy of %s failed verification; downloading it again", obj.key)
        self.remove(path)
        return False

    def reserve(self, path: Path, size: int, for_key: str) -> None:
        """Count `size` bytes for `path` before its download, evicting unpinned files until they fit.

        Counting at reservation, not at commit, keeps concurrent downloads from each seeing the same free room.
        """
        with self._lock:
            if size > self.max_bytes:
                raise ReadError(f"{for_key} ({size} bytes) is larger than the whole cache ({self.max_bytes} bytes)")
            needed = size - self._sizes.get(path, 0)
            for other in list(self._sizes):
                if self._used + needed <= self.max_bytes:
                    break
                if other != path and other not in self._pins:
                    self._remove_locked(other)
            if self._used + needed > self.max_bytes:
                raise ReadError(
                    f"cache of {self.max_bytes} bytes is full of files in use; raise the cache size or lower prefetch"
                )
            self._add_locked(path, size)

    def commit(self, path: Path, md5: str, size: int) -> None:
        _sidecar(path).write_text(md5)
        with self._lock:
            # Counted again: a failed download of the same object may have released the reservation meanwhile.
            self._add_locked(path, size)

    def remove(self, path: Path) -> None:
        with self._lock:
            self._remove_locked(path)

    def abandon(self, path: Path) -> None:
        """Releases a failed download's room, unless another download of the same object (two samples can share
        a start frame) committed it meanwhile: that copy is verified and in use."""
        with self._lock:
            if not _sidecar(path).exists():
                self._remove_locked(path)

    def _add_locked(self, path: Path, size: int) -> None:
        self._used += size - self._sizes.get(path, 0)
        self._sizes[path] = size
        self._sizes.move_to_end(path)

    def _remove_locked(self, path: Path) -> None:
        self._used -= self._sizes.pop(path, 0)
        _sidecar(path).unlink(missing_ok=True)
        path.unlink(missing_ok=True)


class ShardReader:
    """Iterates this rank's samples as local files, fetching `prefetch` samples ahead in the background."""

    def __init__(
        self,
        manifest: Manifest,
        split: Split,
        *,
        rank: int,
        world_size: int,
        store_for: Callable[[str], ObjectStore],
        cache: DiskCache,
        seed: int = 0,
        prefetch: int = PREFETCH,
        workers: int = WORKERS,
        attempts: int = ATTEMPTS,
        backoff_s: float = BACKOFF_S,
    ) -> None:
        self.samples = manifest.split(split)
        self.locations = {d.id: d.location for d in manifest.datasets}
        for d in manifest.datasets:
            self.locations.update(d.conditioning)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.stores = {dataset_id: store_for(dataset_id) for dataset_id in self.locations}
        for dataset_id, store in self.stores.items():
            if store.url != self.locations[dataset_id]:
                raise ReadError(
                    f"dataset '{dataset_id}': the manifest froze {self.locations[dataset_id]} but the job now reads "
                    f"{store.url}: restore the dataset's source or start a new job"
                )
        self.cache = cache
        self.prefetch, self.workers = prefetch, workers
        self.attempts, self.backoff_s = attempts, backoff_s

    def epoch(self, epoch: int) -> Iterator[LocalSample]:
        mine = shard(self.samples, self.rank, self.world_size, seed=self.seed, epoch=epoch)
        pending: deque[tuple[Future[LocalSample], list[Path]]] = deque()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="reader") as pool:
            upcoming = iter(mine)
            try:
                while True:
                    while len(pending) < self.prefetch + 1 and (item := next(upcoming, None)) is not None:
                        pending.append(self._submit(pool, *item))
                    if not pending:
                        return
                    future, pinned = pending.popleft()
                    try:
                        yield future.result()
                    finally:
                        for path in pinned:
                            self.cache.unpin(path)
            finally:
                for future, pinned in pending:
                    future.cancel()
                    for path in pinned:
                        self.cache.unpin(path)

    def _submit(
        self, pool: ThreadPoolExecutor, dataset_id: str, sample: ManifestSample
    ) -> tuple[Future[LocalSample], list[Path]]:
        objects = [(dataset_id, sample.clip)]
        if sample.caption is not None:
            objects.append((dataset_id, sample.caption))
        objects += list(sample.start_frames.items())
        pinned = [self.cache.path_for(self.locations[ds], obj) for ds, obj in objects]
        for path in pinned:
            self.cache.pin(path)
        return pool.submit(self._fetch_sample, dataset_id, sample), pinned

    def _fetch_sample(self, dataset_id: str, sample: ManifestSample) -> LocalSample:
        clip = self.fetch(dataset_id, sample.clip)
        caption = None
        if sample.caption is not None:
            caption = self.fetch(dataset_id, sample.caption).read_text(encoding="utf-8", errors="replace").strip()
        frames = {cid: self.fetch(cid, obj) for cid, obj in sample.start_frames.items()}
        return LocalSample(dataset_id, sample.stem, clip, caption, frames)

    def fetch(self, dataset_id: str, obj: ManifestObject) -> Path:
        """The verified local copy of one object, downloaded if needed, with retries."""
        location = self.locations[dataset_id]
        path = self.cache.path_for(location, obj)
        if self.cache.valid(path, obj):
            return path
        where = f"dataset '{dataset_id}': {location.rstrip('/')}/{obj.key}"
        self.cache.pin(path)  # its reserved room must not be evicted by another thread while it downloads
        try:
            return self._fetch_with_retries(dataset_id, obj, path, where)
        finally:
            self.cache.unpin(path)

    def _fetch_with_retries(self, dataset_id: str, obj: ManifestObject, path: Path, where: str) -> Path:
        for attempt in range(1, self.attempts + 1):
            try:
                self.cache.reserve(path, obj.size, where)
                md5 = self._download(self.stores[dataset_id], obj, path)
                self.cache.commit(path, md5, obj.size)
                return path
            except ObjectChangedError as exc:
                self.cache.abandon(path)
                raise ReadError(
                    f"{where} changed after the manifest was frozen ({exc}): restore it, or start a new job "
                    "so that preflight freezes the data again"
                ) from None
            except ClientError as exc:
                self.cache.abandon(path)
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in _FINAL_CODES:
                    raise ReadError(f"{where}: S3 answered {code}") from None
                error: Exception = exc
            except (BotoCoreError, OSError, VerifyError) as exc:
                self.cache.abandon(path)
                error = exc
            if attempt < self.attempts:
                delay = self.backoff_s * 2 ** (attempt - 1)
                log.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs", where, attempt, self.attempts,
                            type(error).__name__, delay)
                time.sleep(delay)
        raise ReadError(f"{where}: {self.attempts} attempts failed, last: {type(error).__name__}: {error}")

    @staticmethod
    def _download(store: ObjectStore, obj: ManifestObject, path: Path) -> str:
        # Per thread: two samples may share an object (a start frame) and fetch it at once.
        partial = path.with_name(f"{path.name}.{threading.get_ident()}.part")
        try:
            store.download(obj.key, partial, etag=obj.etag)
            size = partial.stat().st_size
            if size != obj.size:
                raise VerifyError(f"{size} bytes, the manifest froze {obj.size}")
            md5 = _md5(partial)
            if _MD5_ETAG.match(obj.etag) and md5 != obj.etag:
                raise VerifyError(f"MD5 {md5} differs from the ETag {obj.etag}")
            partial.replace(path)
            return md5
        finally:
            partial.unlink(missing_ok=True)
