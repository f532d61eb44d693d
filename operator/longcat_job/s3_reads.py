"""Many small reads of one S3 prefix, for the deep preflight: obstore's client instead of botocore's.

The deep check reads three small objects (or ranges) per sample, 60,000 for a 20,000-pair dataset. Through
botocore each GET costs about 2.7 ms of CPU under the GIL, which caps a 2-core machine near 90 samples a second;
obstore's client (Rust, the Apache Arrow `object_store` crate) costs about 0.2 ms and waits without the GIL
(bench/preflight_bench.py). The same endpoint, region and credentials as the location's botocore client, and
errors worded as `s3.access_error` words them.
"""

from __future__ import annotations

import functools
import os
import threading
from datetime import timedelta
from typing import Any

import obstore
from obstore.exceptions import NotFoundError, PermissionDeniedError, UnauthenticatedError
from obstore.store import S3Store as ObstoreS3

from .failures import FailureReason
from .s3 import DEFAULT_REGION, ENDPOINT_URL, REGION, S3AccessError, S3Credentials

# Retries of one read: a few seconds of a restarting server, not minutes (preflight runs again when it fails).
RETRY = {"max_retries": 4, "retry_timeout": timedelta(seconds=30)}


_STORES_LOCK = threading.Lock()


def _store(bucket: str, endpoint: str | None, region: str, credentials: S3Credentials | None) -> ObstoreS3:
    """One client per bucket, endpoint, region and credentials: making one (TLS roots, HTTP pool) costs more CPU
    than the few reads a small job's preflight makes with it."""
    with _STORES_LOCK:
        return _cached_store(bucket, endpoint, region, credentials)


@functools.lru_cache(maxsize=64)
def _cached_store(bucket: str, endpoint: str | None, region: str, credentials: S3Credentials | None) -> ObstoreS3:
    config: dict[str, Any] = {"region": region, "virtual_hosted_style_request": False}
    if endpoint:
        config["endpoint"] = endpoint
    if credentials is not None:
        config["access_key_id"] = credentials.access_key_id
        config["secret_access_key"] = credentials.secret_access_key.get_secret_value()
        if credentials.session_token is not None:
            config["session_token"] = credentials.session_token.get_secret_value()
    return ObstoreS3(bucket, config=config, client_options={"allow_http": True}, retry_config=RETRY)


class SmallReads:
    """get_range / get_bytes of keys under `s3://bucket/prefix`; safe to share between threads."""

    def __init__(self, bucket: str, prefix: str, *, endpoint: str | None, region: str | None,
                 credentials: S3Credentials | None, where: str, credentials_name: str) -> None:
        self._store = _store(bucket, endpoint or os.environ.get(ENDPOINT_URL) or None,
                             region or os.environ.get(REGION) or DEFAULT_REGION, credentials)
        self._prefix = prefix
        self._where, self._credentials_name = where, credentials_name

    def get_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of the object."""
        if end <= start:
            return b""
        try:
            return bytes(obstore.get_range(self._store, self._prefix + key, start=start, end=end))
        except Exception as exc:  # obstore raises its own classes: worded here as every S3 failure is
            raise self._error(exc, key) from None

    def get_bytes(self, key: str) -> bytes:
        try:
            return bytes(obstore.get(self._store, self._prefix + key).bytes())
        except Exception as exc:
            raise self._error(exc, key) from None

    def _error(self, exc: Exception, key: str) -> S3AccessError:
        # obstore's messages carry the request: only the error's class is used, never its text.
        if isinstance(exc, NotFoundError):
            return S3AccessError(f"{self._where} has no object {key} (listed a moment ago: changed meanwhile?)")
        if isinstance(exc, UnauthenticatedError):
            return S3AccessError(f"{self._where} rejected {self._credentials_name}: fix the access key id or secret key",
                                 FailureReason.ACCESS_DENIED)
        if isinstance(exc, PermissionDeniedError):
            return S3AccessError(f"{self._where} denied access to {self._credentials_name}: grant s3:GetObject",
                                 FailureReason.ACCESS_DENIED)
        return S3AccessError(f"{self._where} failed: {type(exc).__name__}; check the endpoint URL and the network")
