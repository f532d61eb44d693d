"""The frozen manifest: written under the output location, read back equal, fingerprints that follow the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longcat_job.api import Location
from longcat_job.sample_manifest import MANIFEST_KEY, ManifestError, build_manifest, read_manifest, write_manifest
from longcat_job.storage import LocalStore, store_for
from tests.datasets import IMAGE, job, local_place, preflight, s3_place
from tests.fixtures.s3 import S3Server

FILES = {
    "train": {"a.mp4": b"clip a", "a.txt": b"caption a", "b.mp4": b"clip b", "b.txt": b"caption b"},
    "frames": {"a.png": IMAGE, "b.png": IMAGE},
    "val": {"v.mp4": b"clip v", "v.txt": b"caption v"},
    "val-frames": {"v.png": IMAGE},
}


@pytest.mark.s3
@pytest.mark.parametrize("where", ["s3", "local"])
def test_manifest_round_trip_under_the_output_location(where: str, s3_server: S3Server, tmp_path: Path) -> None:
    place = s3_place(s3_server) if where == "s3" else local_place(tmp_path / "data")
    spec = job(place.datasets(FILES))
    result = preflight(s3_server if where == "s3" else None, spec)
    assert result.report.ok
    manifest = build_manifest("my-job", spec, result)

    if where == "s3":
        bucket = s3_server.create_bucket()
        output = Location(s3={"bucket": bucket, "prefix": "runs/my-job", "endpoint": s3_server.endpoint})
    else:
        output = Location(local={"path": str(tmp_path / "out")})
    out = store_for(output, what="output", credentials=lambda _n: s3_server.credentials)
    uri = write_manifest(out, manifest)
    assert uri.endswith(f"/{MANIFEST_KEY}") and ("runs/my-job/" in uri if where == "s3" else "out/" in uri)
    assert read_manifest(out) == manifest

    raw = json.loads(out.get_bytes(MANIFEST_KEY))
    train = next(d for d in raw["datasets"] if d["id"] == "train")
    first = train["samples"][0]
    listed = {r.key: r for r in result.stores["train"].list()}
    assert first["clip"] == {"key": "a.mp4", "etag": listed["a.mp4"].etag, "size": 6}
    assert first["caption"]["key"] == "a.txt"
    assert first["start_frames"]["frames"]["key"] == "a.png"
    assert [(d, s.stem) for d, s in manifest.split("validation")] == [("val", "v")]
    assert [(d, s.stem) for d, s in manifest.split("train")] == [("train", "a"), ("train", "b")]


def test_fingerprints_follow_the_data_not_the_job(tmp_path: Path) -> None:
    place = local_place(tmp_path)
    spec = job(place.datasets(FILES))
    first = build_manifest("job-1", spec, preflight(None, spec))
    again = build_manifest("job-2", spec, preflight(None, spec))
    assert again.fingerprint() == first.fingerprint()

    (tmp_path / "train" / "b.mp4").write_bytes(b"clip b, re-encoded")
    changed = build_manifest("job-3", spec, preflight(None, spec))
    assert changed.fingerprint() != first.fingerprint()
    by_id = lambda m: {d.id: d.fingerprint() for d in m.datasets}  # noqa: E731
    assert by_id(changed)["train"] != by_id(first)["train"]
    assert by_id(changed)["val"] == by_id(first)["val"]


def test_a_damaged_manifest_is_refused_with_its_location(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put_bytes(MANIFEST_KEY, b'{"version": 1, "job": "x"}')
    with pytest.raises(ManifestError, match=r"manifest.json is not a valid manifest .*delete it"):
        read_manifest(store)
