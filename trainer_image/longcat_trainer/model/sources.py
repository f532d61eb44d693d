"""Where a model checkpoint comes from, resolved to a local directory in the official layout.

    /path/to/LongCat-Video            a local directory (used in place)
    hf://org/repo[@revision]          Hugging Face Hub via huggingface_hub; token from HF_TOKEN (endpoint: HF_ENDPOINT)
    s3://bucket/prefix                downloaded once into a local cache, checked against the listing, reused

Only the five folders of the layout are fetched, and the distillation LoRA (lora/cfg_step_lora.safetensors) when there. No torch here: the operator's preflight may use it too.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from longcat_job.api import MODEL_CACHE_ENV, Location, S3Access, S3Location
from longcat_job.model_source import CFG_STEP_LORA, ModelSource, ModelSourceError
from longcat_job.storage import ObjectRecord, ObjectStore, store_for

log = logging.getLogger(__name__)

SUBFOLDERS = ("dit", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_CACHE = Path.home() / ".cache" / "longcat-i2v" / "models"
CACHE_MANIFEST = ".longcat-source.json"
PROGRESS_EVERY_S = 10.0


def cache_root() -> Path:
    return Path(os.environ.get(MODEL_CACHE_ENV) or DEFAULT_CACHE)


def resolve_local(path: str) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir():
        raise ModelSourceError(f"model source {path}: no such directory")
    return root


def fetch_hf(repo_id: str, revision: str | None, cache_dir: Path | None = None) -> Path:
    """Snapshot of the layout's folders of a Hub repo (files already in the hub cache are not fetched again)."""
    name = f"hf://{repo_id}" + (f"@{revision}" if revision else "")
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=[f"{folder}/*" for folder in SUBFOLDERS] + [CFG_STEP_LORA],
            cache_dir=cache_dir,
            token=os.environ.get("HF_TOKEN") or None,
        )
    except RevisionNotFoundError:
        raise ModelSourceError(f"model source {name}: revision {revision!r} does not exist in {repo_id}") from None
    except GatedRepoError:
        raise ModelSourceError(
            f"model source {name}: the repository is gated; accept its terms on the Hub and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"model source {name}: repository {repo_id} not found, or private and HF_TOKEN does not grant access"
        ) from None
    except LocalEntryNotFoundError:
        raise ModelSourceError(
            f"model source {name}: the Hub cannot be reached (or HF_HUB_OFFLINE is set) and no cached copy exists; "
            "check the network or use an s3:// or local source"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "unknown"
        raise ModelSourceError(f"model source {name}: the Hub answered HTTP {status}") from None
    return Path(path)


def _cache_dir_for(store: ObjectStore, root: Path) -> Path:
    return root / hashlib.sha256(store.url.encode()).hexdigest()[:16]


def _listing(store: ObjectStore) -> dict[str, ObjectRecord]:
    wanted = tuple(f"{folder}/" for folder in SUBFOLDERS)
    return {r.key: r for r in store.list() if r.key.startswith(wanted) or r.key == CFG_STEP_LORA}


def _read_manifest(target: Path) -> dict[str, list]:
    path = target / CACHE_MANIFEST
    return json.loads(path.read_text()) if path.is_file() else {}


def _is_cached(target: Path, manifest: dict[str, list], record: ObjectRecord) -> bool:
    path = target / record.key
    return manifest.get(record.key) == [record.size, record.etag] and path.is_file() and path.stat().st_size == record.size


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """One process at a time per cached model: the ranks of a pod, and the pods of a node sharing the cache
    volume, queue here; those after the first find the files complete and fetch nothing."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("model cache %s: another process is fetching; waiting for it", lock_path.parent)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_manifest(target: Path, manifest: dict[str, list]) -> None:
    # Written whole and renamed: a process killed mid-write leaves the previous manifest, never half of one.
    partial = target / f"{CACHE_MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=0, sort_keys=True))
    partial.replace(target / CACHE_MANIFEST)


def fetch_store(store: ObjectStore, cache: Path) -> Path:
    """Copy the layout's folders of a store into cache/<hash of its url>/, once (see `_fetch`), holding that
    model's lock."""
    target = _cache_dir_for(store, cache)
    with _exclusive(target.with_name(target.name + ".lock")):
        return _fetch(store, target)


def _fetch(store: ObjectStore, target: Path) -> Path:
    """Copy the layout's folders of a store into `target`.

    The cache's manifest records size and ETag of each file after it is complete. A file is reused when the
    store still lists it with the same size and ETag and the local file has that size; anything else is
    fetched again, each GET pinned to the listed ETag so that an object replaced mid-download is refused
    rather than mixed in. Files the store no longer lists are deleted (a stale shard would be loaded).
    """
    listing = _listing(store)
    missing = [folder for folder in SUBFOLDERS if not any(key.startswith(f"{folder}/") for key in listing)]
    if missing:
        raise ModelSourceError(
            f"model source {store.url}: no {', '.join(m + '/' for m in missing)} under it; upload the checkpoint "
            f"with its folders {', '.join(s + '/' for s in SUBFOLDERS)}"
        )
    manifest = {key: entry for key, entry in _read_manifest(target).items() if key in listing}
    todo = [record for key, record in sorted(listing.items()) if not _is_cached(target, manifest, record)]
    for folder in SUBFOLDERS:
        for path in (target / folder).rglob("*") if (target / folder).is_dir() else ():
            if path.is_file() and path.relative_to(target).as_posix() not in listing:
                path.unlink()
    if not todo:
        log.info("model %s: using the cached copy in %s", store.url, target)
        return target
    total = sum(record.size for record in todo)
    done, started, last_report = 0, time.monotonic(), 0.0
    log.info("model %s: fetching %d files (%.2f GB) into %s", store.url, len(todo), total / 1e9, target)
    for record in todo:
        dest = target / record.key
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = dest.with_name(dest.name + ".partial")
        store.download(record.key, partial, etag=record.etag)
        if partial.stat().st_size != record.size:
            raise ModelSourceError(
                f"model source {store.url}: {record.key} arrived with {partial.stat().st_size} bytes, "
                f"the listing says {record.size}; run again to retry"
            )
        partial.replace(dest)
        manifest[record.key] = [record.size, record.etag]
        _write_manifest(target, manifest)
        done += record.size
        now = time.monotonic()
        if now - last_report >= PROGRESS_EVERY_S or done == total:
            rate = done / max(now - started, 1e-6)
            eta = (total - done) / rate if rate else float("inf")
            log.info("model %s: %.2f/%.2f GB, %.1f MB/s, ETA %.0fs", store.url, done / 1e9, total / 1e9, rate / 1e6, eta)
            last_report = now
    return target


def s3_store(bucket: str, prefix: str, storage: S3Access | None = None) -> ObjectStore:
    """The store of an s3:// source at the endpoint of `storage` (spec.model.storage; else AWS_ENDPOINT_URL or
    AWS), with the credentials of the environment (in a pod, the Secret that storage names)."""
    access = storage.model_dump() if storage is not None else {}
    location = Location(s3=S3Location(bucket=bucket, prefix=prefix, **access))
    return store_for(location, what=f"model source s3://{bucket}/{prefix} (spec.model.source)")


def resolve_model_source(source: str, *, storage: S3Access | None = None, cache: Path | None = None) -> Path:
    """Local directory holding the checkpoint named by `source` (see the module docstring); `storage` says
    where an s3:// source's endpoint is."""
    parsed = ModelSource.parse(source)
    if parsed.kind == "local":
        return resolve_local(parsed.location)
    if parsed.kind == "hf":
        return fetch_hf(parsed.location, parsed.revision, cache_dir=cache)
    return fetch_store(s3_store(parsed.location, parsed.prefix, storage), cache or cache_root())
