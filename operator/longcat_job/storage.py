"""One small interface over where datasets and outputs live: an S3 prefix or a local directory.

Both stores yield the same `ObjectRecord`s (key relative to the store's root, size, etag), so preflight,
manifest and reader have one code path. The ETag of an S3 object is the server's. A local file's "etag" is
`local-<size hex>-<mtime_ns hex>`: hashing every clip of a large dataset at each preflight would take
minutes, and a rewrite of a file changes its mtime (a `touch` alone also invalidates, which is harmless).
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from .api import Location
from .s3 import S3Credentials, ThreadClient, access_error, endpoint_of

# ListObjectsV2 returns at most 1000 keys a page whatever is asked.
LIST_PAGE_SIZE = 1000


@dataclass(frozen=True, slots=True)
class ObjectRecord:
    key: str  # relative to the store's root, '/'-separated
    size: int
    etag: str


class ObjectStore(Protocol):
    url: str  # for messages and the manifest: s3://bucket/prefix or file:///path

    def list(self) -> Iterator[ObjectRecord]: ...

    def stat(self, key: str) -> ObjectRecord: ...

    def open_ranged(self, key: str, *, size: int | None = None, block: int = ...) -> BinaryIO:
        """A seekable file that reads only what is asked for; `size` (from a listing) saves asking for it."""
        ...

    def get_bytes(self, key: str) -> bytes: ...

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None: ...

    def download(self, key: str, dest: Path, *, etag: str) -> ObjectRecord: ...

    def for_small_reads(self) -> ObjectStore:
        """This store, tuned for many small reads (open_ranged, get_bytes, get_range) from many threads."""
        ...


class ObjectChangedError(Exception):
    """The object is no longer the one the manifest froze (its ETag differs)."""


def local_etag(st: os.stat_result) -> str:
    return f"local-{st.st_size:x}-{st.st_mtime_ns:x}"


class LocalStore:
    def __init__(self, root: Path, *, what: str = "local directory") -> None:
        self.root = Path(root)
        self.url = self.root.resolve().as_uri()
        self.what = what

    def _path(self, key: str) -> Path:
        return self.root / PurePosixPath(key)

    def list(self) -> Iterator[ObjectRecord]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.what}: {self.root} is not a directory: create it or fix the path")
        # os.walk's scandir gives stat results cheaply; order is made stable by the caller sorting keys.
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                st = os.stat(os.path.join(dirpath, name))
                key = name if rel_dir == "." else f"{rel_dir}/{name}"
                yield ObjectRecord(key=key, size=st.st_size, etag=local_etag(st))

    def stat(self, key: str) -> ObjectRecord:
        st = self._path(key).stat()
        return ObjectRecord(key=key, size=st.st_size, etag=local_etag(st))

    def open_ranged(self, key: str, *, size: int | None = None, block: int = 0) -> BinaryIO:
        return self._path(key).open("rb")

    def for_small_reads(self) -> LocalStore:
        return self

    def get_bytes(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)

    def download(self, key: str, dest: Path, *, etag: str) -> ObjectRecord:
        before = self.stat(key)
        if before.etag != etag:
            raise ObjectChangedError(f"{self.url}/{key}: etag {before.etag}, the manifest froze {etag}")
        shutil.copyfile(self._path(key), dest)
        after = self.stat(key)
        if after != before:
            raise ObjectChangedError(f"{self.url}/{key} changed while it was copied")
        return after


class S3Store:
    def __init__(
        self, client: Any, bucket: str, prefix: str = "", *, what: str, secret_name: str | None = None
    ) -> None:
        self.client = client
        self.bucket = bucket
        # A prefix names a folder: "clips" and "clips/" both mean the keys under "clips/".
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.what = what
        self.secret_name = secret_name

    def error(self, exc: Exception) -> Exception:
        return access_error(
            exc, what=self.what, bucket=self.bucket, endpoint=endpoint_of(self.client), secret_name=self.secret_name
        )

    def for_small_reads(self) -> ObjectStore:
        """The same objects read through obstore's client where the store's own is botocore's (s3_reads.py)."""
        if not isinstance(self.client, ThreadClient):  # a client given explicitly (tests): read through it
            return self
        from .s3_reads import SmallReads  # noqa: PLC0415 - only preflight's deep check needs obstore

        client = self.client
        credentials_name = (f"the credentials in Secret '{self.secret_name}'" if self.secret_name
                            else "the AWS_* credentials of the environment")
        reads = SmallReads(self.bucket, self.prefix, endpoint=client.endpoint, region=client.region,
                           credentials=client.credentials, where=f"{self.what}: bucket '{self.bucket}'",
                           credentials_name=credentials_name)
        return SmallReadsStore(self, reads)

    def list(self) -> Iterator[ObjectRecord]:
        paginator = self.client.get_paginator("list_objects_v2")
        cut = len(self.prefix)
        try:
            for page in paginator.paginate(
                Bucket=self.bucket, Prefix=self.prefix, PaginationConfig={"PageSize": LIST_PAGE_SIZE}
            ):
                for obj in page.get("Contents", ()):
                    key = obj["Key"][cut:]
                    if key and not key.endswith("/"):  # "folder" marker objects are not data
                        yield ObjectRecord(key=key, size=obj["Size"], etag=obj["ETag"].strip('"'))
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc) from None

    def stat(self, key: str) -> ObjectRecord:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc) from None
        return ObjectRecord(key=key, size=head["ContentLength"], etag=head["ETag"].strip('"'))

    def open_ranged(self, key: str, *, size: int | None = None, block: int = 256 * 1024) -> BinaryIO:
        # Buffered: a read of n bytes returns n bytes (across blocks), as parsers such as Pillow expect.
        return io.BufferedReader(RangedObject(self, key, size=size, block=block))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc) from None

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key, Range=f"bytes={start}-{end - 1}")
            return body["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc) from None

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """`content_type` lets a browser play or render the object straight from the bucket."""
        extra = {"ContentType": content_type} if content_type else {}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, **extra)
        except (ClientError, BotoCoreError) as exc:
            raise self.error(exc) from None

    def download(self, key: str, dest: Path, *, etag: str) -> ObjectRecord:
        """GET with If-Match, so a changed object is refused by the server instead of read."""
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key, IfMatch=f'"{etag}"')
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise ObjectChangedError(f"{self.url}{key}: its ETag is no longer {etag}") from None
            raise
        got = response["ETag"].strip('"')
        if got != etag:
            raise ObjectChangedError(f"{self.url}{key}: ETag {got}, the manifest froze {etag}")
        with dest.open("wb") as out:
            for chunk in response["Body"].iter_chunks(1 << 20):
                out.write(chunk)
        return ObjectRecord(key=key, size=response["ContentLength"], etag=got)


class SmallReadsStore:
    """An S3Store whose reads go through `reads` (open_ranged, get_bytes, get_range); the rest through the store."""

    def __init__(self, store: S3Store, reads: Any) -> None:
        self._store, self._reads = store, reads
        self.url = store.url

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def get_range(self, key: str, start: int, end: int) -> bytes:
        return self._reads.get_range(key, start, end)

    def get_bytes(self, key: str) -> bytes:
        return self._reads.get_bytes(key)

    def open_ranged(self, key: str, *, size: int | None = None, block: int = 256 * 1024) -> BinaryIO:
        return io.BufferedReader(RangedObject(self, key, size=size, block=block))

    def for_small_reads(self) -> SmallReadsStore:
        return self


class RangedObject(io.RawIOBase):
    """A seekable read-only file over an S3 object, reading only the ranges asked for (for PyAV's probe).

    Reads are rounded up to `block` bytes so that a demuxer's many small reads cost few requests; an object
    no larger than a block costs one GET. Without `size` its size is asked for first (a HEAD).
    """

    def __init__(self, store: S3Store | SmallReadsStore, key: str, *, size: int | None = None,
                 block: int = 256 * 1024) -> None:
        super().__init__()
        self._store = store
        self._key = key
        self._size = store.stat(key).size if size is None else size
        self._blocksize = block
        self._pos = 0
        self._block_start = -1
        self._block = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        in_block = self._block_start <= self._pos < self._block_start + len(self._block)
        if not in_block:
            self._block_start = self._pos
            end = min(self._size, self._pos + max(want, self._blocksize))
            self._block = self._store.get_range(self._key, self._pos, end)
        offset = self._pos - self._block_start
        data = self._block[offset : offset + want]
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


# Secret name (None: the pod's own identity) -> credentials. The operator reads the Secret from the API;
# the trainer and the CLI use `env_credentials`.
CredentialsLookup = Callable[[str | None], S3Credentials | None]


def env_credentials(secret_name: str | None) -> S3Credentials | None:
    return S3Credentials.from_env()


def store_for(location: Location, *, what: str, credentials: CredentialsLookup = env_credentials) -> ObjectStore:
    """The store of a spec's Location; `what` names it in errors (e.g. "dataset 'clips'")."""
    if location.local is not None:
        return LocalStore(Path(location.local.path.removeprefix("file://")), what=what)
    s3 = location.s3
    assert s3 is not None  # Location's rule: exactly one of s3 / local
    client = ThreadClient(s3.endpoint, s3.region, credentials(s3.credentials_secret))
    return S3Store(client, s3.bucket, s3.prefix, what=what, secret_name=s3.credentials_secret)
