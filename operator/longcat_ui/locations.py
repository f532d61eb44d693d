"""Output locations as `serve --output` names them, and stores for folders below them."""

from __future__ import annotations

from pathlib import Path

from longcat_job.api import Location
from longcat_job.storage import LocalStore, ObjectStore, S3Store, store_for


def output_store(text: str) -> ObjectStore:
    """`s3://BUCKET/PREFIX` (endpoint and credentials from the AWS_* environment, as the trainer's pods) or a
    directory; raises ValueError naming --output."""
    if text.startswith("s3://"):
        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"--output {text}: name a bucket, e.g. s3://BUCKET/PREFIX")
        return store_for(Location.model_validate({"s3": {"bucket": bucket, "prefix": prefix}}), what="--output")
    path = Path(text)
    if not path.is_dir():
        raise ValueError(f"--output {text}: not a directory; pass a job's output folder, a folder of them, "
                         "or s3://BUCKET/PREFIX")
    return LocalStore(path, what="--output")


def under(store: ObjectStore, folder: str) -> ObjectStore:
    """The store of the keys under `folder/`: one job of a folder of jobs, or the LoRA files of a job."""
    if isinstance(store, LocalStore):
        return LocalStore(store.root / folder, what=store.what)
    assert isinstance(store, S3Store)
    return S3Store(store.client, store.bucket, store.prefix + folder, what=store.what, secret_name=store.secret_name)


def children(store: ObjectStore) -> list[str]:
    """The immediate sub-folders of a store (a folder of jobs), without listing everything below them."""
    if isinstance(store, LocalStore):
        return sorted(p.name for p in store.root.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert isinstance(store, S3Store)
    pages = store.client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket, Prefix=store.prefix,
                                                                   Delimiter="/")
    return sorted(p["Prefix"][len(store.prefix):].rstrip("/") for page in pages for p in page.get("CommonPrefixes", ()))
