"""Preflight: pairing as a pure function, then every problem kind against the real S3 server and a real
directory, the 1,000-clip case, the deep check with real encoded clips, and errors of access."""

from __future__ import annotations

from pathlib import Path

import pytest

from longcat_job.api import JobSpec
from longcat_job.pairing import (
    CLIP_EXTENSIONS,
    IMAGE_EXTENSIONS,
    Listing,
    ProblemKind,
    classify,
    pair,
    report_orphan_start_frames,
)
from longcat_job.preflight import PreflightResult, run_preflight
from longcat_job.s3 import S3Credentials
from longcat_job.sample_check import read_clip_header
from longcat_job.sample_manifest import build_manifest
from longcat_job.storage import ObjectRecord, S3Store
from tests.datasets import CLIP, IMAGE, encode_clip, job, local_place, png, preflight, s3_place
from tests.fixtures.cluster import free_port
from tests.fixtures.s3 import S3Server

K = ProblemKind


def problems(result: PreflightResult, dataset_id: str) -> dict[ProblemKind, list[str]]:
    return {p.kind: p.examples for p in result.report.dataset(dataset_id).problems}


# --- pure pairing ------------------------------------------------------------------------------------------


def _records(*keys: str, empty: tuple[str, ...] = ()) -> list[ObjectRecord]:
    return [ObjectRecord(key, 0 if key in empty else 10, f"etag-{key}") for key in keys]


def test_pairing_is_by_stem_including_subfolders_and_counts_exactly() -> None:
    clips = classify(
        Listing("train", "s3://b/train/", _records("a.mp4", "a.txt", "x/b.MOV", "x/b.txt", "c.mp4", "c.txt",
                                                   "d.webm", "e.mkv", "e.txt", empty=("e.txt",))),
        media_extensions=CLIP_EXTENSIONS, captions=True,
    )
    frames = classify(Listing("frames", "s3://b/frames/", _records("a.png", "x/b.jpeg", "d.webp", "e.jpg", "b.png")),
                      media_extensions=IMAGE_EXTENSIONS, captions=False)
    paired = pair(clips, [frames], captions=True)
    report_orphan_start_frames(frames, [clips])
    assert [s.stem for s in paired.samples] == ["a", "x/b"]
    assert paired.samples[1].start_frames["frames"].key == "x/b.jpeg"
    found = {(p.kind, p.related): (p.count, p.examples) for p in clips.problems.all()}
    assert found == {
        (K.CLIP_WITHOUT_START_FRAME, "frames"): (1, ["c.mp4"]),
        (K.CLIP_WITHOUT_CAPTION, None): (1, ["d.webm"]),
        (K.EMPTY_CAPTION, None): (1, ["e.txt"]),
    }
    orphans = {p.kind: p.examples for p in frames.problems.all()}
    assert orphans == {K.START_FRAME_WITHOUT_CLIP: ["b.png"]}  # "b" is not "x/b"


def test_only_the_first_twenty_keys_are_kept_but_counts_are_exact() -> None:
    keys = [f"clip{i:03d}.mp4" for i in range(50)]
    clips = classify(Listing("t", "u", _records(*keys)), media_extensions=CLIP_EXTENSIONS, captions=True)
    pair(clips, [], captions=True)
    [missing] = clips.problems.all()
    assert missing.count == 50 and missing.examples == keys[:20]


# --- every problem kind, against the real server and a real directory ---------------------------------------

LAYOUT = {
    "train": {
        "good1.mp4": CLIP, "good1.txt": b"a cat walks",
        "sub/good2.mov": CLIP, "sub/good2.txt": b"a dog runs",
        "noframe.mp4": CLIP, "noframe.txt": b"no start frame",
        "nocap.mp4": CLIP,
        "emptycap.mp4": CLIP, "emptycap.txt": b"",
        "orphan-caption.txt": b"no clip",
        "dup.mp4": CLIP, "dup.mov": CLIP, "dup.txt": b"two clips, one stem",
        "notes.json": b"{}",
    },
    "frames": {
        "good1.png": IMAGE, "sub/good2.jpg": IMAGE, "nocap.webp": IMAGE, "emptycap.jpeg": IMAGE, "dup.png": IMAGE,
        "lonely.png": IMAGE, "clip-in-frames.mp4": CLIP,
    },
    "val": {},
    "val-frames": {"v1.png": IMAGE},
}
EXPECTED = {
    ("train", K.CLIP_WITHOUT_START_FRAME): ["noframe.mp4"],
    ("train", K.CLIP_WITHOUT_CAPTION): ["nocap.mp4"],
    ("train", K.EMPTY_CAPTION): ["emptycap.txt"],
    ("train", K.CAPTION_WITHOUT_CLIP): ["orphan-caption.txt"],
    ("train", K.DUPLICATE_STEM): ["dup.mov", "dup.mp4"],
    ("train", K.UNKNOWN_TYPE): ["notes.json"],
    ("frames", K.START_FRAME_WITHOUT_CLIP): ["lonely.png"],
    ("frames", K.UNKNOWN_TYPE): ["clip-in-frames.mp4"],
    ("val-frames", K.START_FRAME_WITHOUT_CLIP): ["v1.png"],
}


@pytest.fixture(scope="module", params=["s3", "local"])
def layout_result(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PreflightResult:
    if request.param == "s3":
        server = request.getfixturevalue("s3_server")
        place = s3_place(server)
    else:
        server, place = None, local_place(tmp_path_factory.mktemp("datasets"))
    return preflight(server, job(place.datasets(LAYOUT)))


@pytest.mark.s3
@pytest.mark.parametrize(("dataset_id", "kind"), [*EXPECTED, ("val", K.EMPTY_PREFIX)], ids=lambda v: str(v))
def test_each_problem_kind_is_found_by_key(layout_result: PreflightResult, dataset_id: str, kind: ProblemKind) -> None:
    found = problems(layout_result, dataset_id)
    if kind is K.EMPTY_PREFIX:
        assert found == {K.EMPTY_PREFIX: [layout_result.stores["val"].url]}
    else:
        assert found[kind] == EXPECTED[(dataset_id, kind)]


@pytest.mark.s3
def test_layout_counts_and_nothing_else_reported(layout_result: PreflightResult) -> None:
    report = layout_result.report
    assert not report.ok
    for dataset_id in ("train", "frames", "val-frames"):
        assert problems(layout_result, dataset_id) == {
            kind: keys for (ds, kind), keys in EXPECTED.items() if ds == dataset_id
        }
    train = report.dataset("train")
    assert (train.objects, train.media, train.captions) == (len(LAYOUT["train"]), 6, 6)  # stems: dup counts once
    # dup still pairs (its error fails the job regardless); the other incomplete clips make no sample.
    assert [s.stem for s in layout_result.samples["train"]] == ["dup", "good1", "sub/good2"]
    assert train.samples == 3
    assert report.dataset("val").role == "validation" and report.dataset("val").samples == 0
    status = train.to_status()
    assert status.problems == 5  # errors only: no frame, no caption, empty caption, two duplicates
    assert sorted(status.first_problems[:5]) == [  # errors before warnings
        "ClipWithoutCaption: nocap.mp4", "ClipWithoutStartFrame: noframe.mp4", "DuplicateStem: dup.mov",
        "DuplicateStem: dup.mp4", "EmptyCaption: emptycap.txt",
    ]
    assert sorted(status.first_problems[5:]) == ["CaptionWithoutClip: orphan-caption.txt", "UnknownType: notes.json"]
    assert any("orphan-caption.txt" in line for line in report.lines())


@pytest.mark.s3
@pytest.mark.slow
def test_thousand_clips_report_names_exactly_the_five_broken(s3_server: S3Server) -> None:
    no_frame = {"clip0007", "clip0500", "clip0999"}
    no_caption = {"clip0001", "clip0642"}
    files: dict[str, dict[str, bytes]] = {"train": {}, "frames": {}}
    for i in range(1000):
        stem = f"clip{i:04d}"
        files["train"][f"{stem}.mp4"] = CLIP
        if stem not in no_caption:
            files["train"][f"{stem}.txt"] = f"caption {i}".encode()
        if stem not in no_frame:
            files["frames"][f"{stem}.png"] = IMAGE
    result = preflight(s3_server, job(s3_place(s3_server).datasets(files)))
    train = result.report.dataset("train")
    assert problems(result, "train") == {
        K.CLIP_WITHOUT_START_FRAME: sorted(f"{s}.mp4" for s in no_frame),
        K.CLIP_WITHOUT_CAPTION: sorted(f"{s}.mp4" for s in no_caption),
    }
    assert problems(result, "frames") == {}
    assert (train.objects, train.samples, train.errors) == (1998, 995, 5)
    assert sorted(train.to_status().first_problems) == sorted(
        [f"ClipWithoutStartFrame: {s}.mp4" for s in no_frame] + [f"ClipWithoutCaption: {s}.mp4" for s in no_caption]
    )


# --- deep check -------------------------------------------------------------------------------------------------

GOOD_CLIP = encode_clip(9, 48, 32)
GOOD_FRAME = png(48, 32)
GOOD_STEMS = [f"good{i:02d}" for i in range(20)]
# The holes a new user's dataset typically has: stem -> (its files, the kind found, the example reported).
HOLES = {
    "short": ({"short.mp4": encode_clip(5, 48, 32)}, K.CLIP_TOO_SHORT, "short.mp4 (5 < 9 frames)"),
    "small": ({"small.mp4": encode_clip(9, 32, 16), "small.png": png(32, 16)}, K.CLIP_TOO_SMALL,
              "small.mp4 (32x16 < 32)"),
    "corrupt": ({"corrupt.mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(200)}, K.CLIP_UNREADABLE, "corrupt.mp4 ("),
    "empty": ({"empty.mp4": b""}, K.CLIP_UNREADABLE, "empty.mp4 (0 bytes)"),
    "blank": ({"blank.txt": b"  \n\t"}, K.EMPTY_CAPTION, "blank.txt"),
    "latin1": ({"latin1.txt": "un café".encode("latin-1")}, K.CAPTION_NOT_UTF8, "latin1.txt (byte 6 is not UTF-8)"),
    "long": ({"long.txt": b"a cat " * 1000}, K.CAPTION_TOO_LONG, "long.txt (6000 characters > 4000)"),
    "wrongsize": ({"wrongsize.png": png(64, 64)}, K.START_FRAME_SIZE_MISMATCH,
                  "frames/wrongsize.png (64x64, its clip wrongsize.mp4 is 48x32)"),
    "badframe": ({"badframe.png": b"\x89PNG\r\n\x1a\n truncated"}, K.START_FRAME_UNREADABLE,
                 "frames/badframe.png ("),
}


def holey_dataset() -> dict[str, dict[str, bytes]]:
    """20 good samples and one sample per hole: the hole's file replaces the good one of its kind."""
    files: dict[str, dict[str, bytes]] = {"train": {}, "frames": {}}
    for stem in GOOD_STEMS + list(HOLES):
        files["train"] |= {f"{stem}.mp4": GOOD_CLIP, f"{stem}.txt": f"a clip called {stem}".encode()}
        files["frames"][f"{stem}.png"] = GOOD_FRAME
    for stem, (overrides, _, _) in HOLES.items():
        for key, data in overrides.items():
            files["frames" if key.endswith(".png") else "train"][key] = data
    return files


@pytest.fixture(scope="module", params=["s3", "local"])
def deep_result(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PreflightResult:
    server = request.getfixturevalue("s3_server") if request.param == "s3" else None
    place = s3_place(server) if server else local_place(tmp_path_factory.mktemp("holes"))
    return preflight(server, job(place.datasets(holey_dataset()), frames=9, resolution=32), deep=True)


@pytest.mark.s3
@pytest.mark.parametrize("stem", list(HOLES))
def test_deep_preflight_names_each_hole_with_its_file(deep_result: PreflightResult, stem: str) -> None:
    _, kind, example = HOLES[stem]
    found = problems(deep_result, "train")
    assert kind in found, found
    assert any(e.startswith(example) for e in found[kind]), found[kind]
    assert any(e.key == f"{stem}.mp4" and e.reason.startswith(kind.value) for e in deep_result.excluded)


@pytest.mark.s3
def test_deep_preflight_keeps_every_good_sample_and_refuses_too_many_holes(deep_result: PreflightResult) -> None:
    assert [s.stem for s in deep_result.samples["train"]] == GOOD_STEMS  # no good clip lost on the way
    report = deep_result.report
    assert (report.clips, report.unusable) == (29, 9) and report.too_many_unusable and not report.ok
    assert "9 of 29 samples are unusable (31.0 %" in "\n".join(report.lines())
    status = report.dataset("train").to_status()
    assert status.problems == 9 and status.samples == 20


@pytest.mark.s3
def test_holes_within_the_bad_fraction_are_left_out_of_the_manifest(s3_server: S3Server) -> None:
    files = holey_dataset()
    spec = job(s3_place(s3_server).datasets(files), frames=9, resolution=32)
    spec.training.max_bad_sample_fraction = 0.5
    result = preflight(s3_server, spec, deep=True)
    assert result.report.ok
    manifest = build_manifest("holes", spec, result)
    assert [sample.stem for _, sample in manifest.split("train")] == GOOD_STEMS
    left_out = manifest.excluded("train")
    assert len(left_out) == 9 and "train/corrupt.mp4: ClipUnreadable: corrupt.mp4 (" in " ".join(left_out)


@pytest.mark.s3
def test_clip_header_is_read_with_ranged_requests(s3_server: S3Server, s3_bucket: str) -> None:
    noise = encode_clip(49, 256, 256, noise=True)
    s3_server.client().put_object(Bucket=s3_bucket, Key="big.mp4", Body=noise)

    class CountingStore(S3Store):
        fetched = 0

        def get_range(self, key: str, start: int, end: int) -> bytes:
            CountingStore.fetched += end - start
            return super().get_range(key, start, end)

    record = ObjectRecord("big.mp4", len(noise), "unused")
    header = read_clip_header(CountingStore(s3_server.client(), s3_bucket, what="dataset 'x'"), record)
    assert (header.frames, header.width, header.height) == (49, 256, 256)
    assert 0 < CountingStore.fetched < len(noise) / 2


# --- errors of access --------------------------------------------------------------------------------------------


def _s3_job(bucket: str, endpoint: str) -> JobSpec:
    loc = {"s3": {"bucket": bucket, "prefix": "train/", "endpoint": endpoint, "credentialsSecret": "data-creds"}}
    frames = {"s3": {**loc["s3"], "prefix": "frames/"}}
    return job({"train": loc, "frames": frames})


def _assert_access_error(result: PreflightResult, bucket: str, *, contains: str, secret: str) -> None:
    report = result.report
    assert not report.ok
    for dataset_id, index in (("train", 0), ("frames", 1)):
        error = report.dataset(dataset_id).access_error
        assert error is not None
        assert f"dataset '{dataset_id}' (spec.datasets[{index}].source.s3)" in error
        assert f"bucket '{bucket}'" in error and contains in error
    assert secret not in "\n".join(report.lines()) + report.model_dump_json()


@pytest.mark.s3
def test_missing_bucket_names_dataset_and_bucket(s3_server: S3Server) -> None:
    result = preflight(s3_server, _s3_job("no-such-bucket", s3_server.endpoint))
    _assert_access_error(result, "no-such-bucket", contains="does not exist",
                         secret=s3_server.credentials.secret_access_key.get_secret_value())


@pytest.mark.s3
def test_wrong_credentials_name_the_secret_not_its_value(s3_server: S3Server, s3_bucket: str) -> None:
    wrong = S3Credentials(access_key_id=s3_server.credentials.access_key_id, secret_access_key="wr0ng-s3cret-value")
    result = run_preflight(_s3_job(s3_bucket, s3_server.endpoint), credentials=lambda _name: wrong)
    _assert_access_error(result, s3_bucket, contains="rejected the credentials in Secret 'data-creds'",
                         secret="wr0ng-s3cret-value")


@pytest.mark.s3
def test_wrong_endpoint_says_it_cannot_be_reached(s3_server: S3Server) -> None:
    port = free_port()
    result = preflight(s3_server, _s3_job("some-bucket", f"http://127.0.0.1:{port}"))
    _assert_access_error(result, "some-bucket", contains="cannot be reached",
                         secret=s3_server.credentials.secret_access_key.get_secret_value())


def test_missing_local_directory_names_the_dataset(tmp_path: Path) -> None:
    spec = job({"train": {"local": {"path": str(tmp_path / "nope")}}, "frames": {"local": {"path": str(tmp_path)}}})
    result = run_preflight(spec)
    error = result.report.dataset("train").access_error
    assert error is not None and "dataset 'train'" in error and str(tmp_path / "nope") in error
