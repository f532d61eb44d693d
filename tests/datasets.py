"""Datasets for tests, written to the real S3 server or a real directory, and the jobs that read them."""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from pathlib import Path

import av
import numpy as np
from PIL import Image

from longcat_job.api import JobSpec
from longcat_job.preflight import PreflightResult, run_preflight
from tests.fixtures.s3 import S3Server, put_objects

# Shallow preflight never decodes: any bytes do for a clip or an image.
CLIP = b"\x00\x00\x00\x18ftypmp42 not decoded by the shallow check"
IMAGE = b"\x89PNG\r\n\x1a\n not decoded either"


def encode_clip(frames: int, width: int, height: int, *, noise: bool = False) -> bytes:
    """An H.264 MP4; `noise` makes frames incompressible, for clips of a few MB."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            if noise:
                image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            else:
                image = np.full((height, width, 3), (i * 25) % 256, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def png(width: int, height: int) -> bytes:
    """A real PNG of that size."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


def job(locations: Mapping[str, dict], *, frames: int = 93, resolution: int = 480) -> JobSpec:
    """A job with video dataset `train` (start frames in `frames`) and, when given, `val` / `val-frames`."""
    datasets = [
        {"id": "train", "type": "video", "isI2V": True, "source": locations["train"], "captionStrategy": "textfile",
         "conditioningData": ["frames"], "frames": frames, "resolution": resolution},
        {"id": "frames", "type": "conditioning", "source": locations["frames"], "resolution": resolution},
    ]
    validation = {}
    if "val" in locations:
        datasets += [
            {"id": "val", "type": "video", "isI2V": True, "source": locations["val"], "captionStrategy": "textfile",
             "conditioningData": ["val-frames"]},
            {"id": "val-frames", "type": "conditioning", "source": locations["val-frames"]},
        ]
        validation = {"evalDatasetId": "val"}
    return JobSpec.model_validate(
        {"datasets": datasets, "validation": validation, "output": {"local": {"path": "/tmp/unused"}}}
    )


class Place:
    """Datasets in one S3 bucket (a prefix each) or in one directory (a subdirectory each)."""

    def __init__(self, write: Callable[[Mapping[str, bytes]], None], location: Callable[[str], dict]) -> None:
        self.write, self.location = write, location

    def datasets(self, files: Mapping[str, Mapping[str, bytes]]) -> dict[str, dict]:
        self.write({f"{ds}/{key}": data for ds, objects in files.items() for key, data in objects.items()})
        return {ds: self.location(ds) for ds in files}


def s3_place(server: S3Server) -> Place:
    bucket = server.create_bucket()
    return Place(
        lambda objects: put_objects(server.client(), bucket, objects),
        lambda ds: {"s3": {"bucket": bucket, "prefix": f"{ds}/", "endpoint": server.endpoint}},
    )


def local_place(root: Path) -> Place:
    def write(objects: Mapping[str, bytes]) -> None:
        for key, data in objects.items():
            (root / key).parent.mkdir(parents=True, exist_ok=True)
            (root / key).write_bytes(data)

    def location(ds: str) -> dict:
        (root / ds).mkdir(parents=True, exist_ok=True)
        return {"local": {"path": str(root / ds)}}

    return Place(write, location)


def preflight(server: S3Server | None, spec: JobSpec, *, deep: bool = False, **kwargs) -> PreflightResult:
    """Shallow unless asked: most tests here are about listing and pairing, with bytes that do not decode."""
    creds = server.credentials if server else None
    return run_preflight(spec, credentials=lambda _name: creds, deep=deep, **kwargs)
