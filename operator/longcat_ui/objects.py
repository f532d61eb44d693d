"""Objects of an output location streamed through the server, with HTTP Range requests (a <video> seeks
and reads its index with them): the browser never sees a credential or a signed URL."""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Iterator
from pathlib import PurePosixPath

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse

from longcat_job.s3 import S3AccessError
from longcat_job.storage import ObjectStore

CHUNK = 256 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
mimetypes.add_type("video/mp4", ".mp4")


def safe_key(key: str) -> bool:
    """A key below the store's root: no '..', no absolute path, no empty or hidden part."""
    parts = PurePosixPath(key).parts
    return bool(parts) and not key.startswith("/") and "\\" not in key and all(
        p not in ("", ".", "..") for p in parts)


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive of a single `bytes=` range; None for the whole object; ValueError when it
    cannot be satisfied."""
    if not header:
        return None
    match = _RANGE.match(header.strip())
    if not match or match.groups() == ("", ""):
        raise ValueError(header)
    first, last = match.groups()
    if first == "":  # the last N bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start > end or start >= size:
        raise ValueError(header)
    return start, end


def _chunks(store: ObjectStore, key: str, size: int, start: int, end: int) -> Iterator[bytes]:
    with store.open_ranged(key, size=size) as stream:
        stream.seek(start)
        left = end - start + 1
        while left > 0:
            data = stream.read(min(CHUNK, left))
            if not data:
                return
            left -= len(data)
            yield data


def object_response(store: ObjectStore, key: str, request: Request, *, download: bool = False) -> Response:
    if not safe_key(key):
        return PlainTextResponse(f"{key!r} is not a key of this job's output", status_code=400)
    try:
        size = store.stat(key).size
    except (FileNotFoundError, S3AccessError):
        return PlainTextResponse(f"{key} is not in this job's output", status_code=404)
    media = mimetypes.guess_type(key)[0] or "application/octet-stream"
    headers = {"Accept-Ranges": "bytes"}
    if download:
        headers["Content-Disposition"] = f'attachment; filename="{PurePosixPath(key).name}"'
    try:
        wanted = byte_range(request.headers.get("range"), size)
    except ValueError:
        return Response(status_code=416, headers={"Content-Range": f"bytes */{size}"})
    start, end = wanted or (0, size - 1)
    headers["Content-Length"] = str(end - start + 1)
    if wanted is None:
        return StreamingResponse(_chunks(store, key, size, 0, size - 1), media_type=media, headers=headers)
    headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    return StreamingResponse(_chunks(store, key, size, start, end), status_code=206, media_type=media,
                             headers=headers)
