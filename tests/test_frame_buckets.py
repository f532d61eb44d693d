"""Frame buckets: preflight counts the clips per bucket and names the short ones; the trainer encodes each clip
at the largest bucket it fills, from its frame 0, and every batch holds one bucket."""

from __future__ import annotations

from pathlib import Path

import pytest

from longcat_job.buckets import frame_bucket
from longcat_job.parse import parse_job
from longcat_job.preflight import run_preflight
from longcat_job.storage import LocalStore
from longcat_trainer import train
from longcat_trainer.data.batches import epoch_batches
from longcat_trainer.data.entries import read_layout
from longcat_trainer.data.synthetic import encode_mp4, encode_png, render, shape_clips
from tests.fixtures.training import job_document, location, with_vae_cache

# clip stem -> its frame count; with buckets [5, 9]: 9, 9, 5, 5 and too short
LENGTHS = {"shape-000": 9, "shape-001": 11, "shape-002": 5, "shape-003": 8, "shape-004": 3}


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lengths")
    store = LocalStore(root)
    for clip in shape_clips(len(LENGTHS)):
        video = render(clip, LENGTHS[clip.stem], 64, 112)
        store.put_bytes(f"clips/{clip.stem}.mp4", encode_mp4(video, fps=16))
        store.put_bytes(f"clips/{clip.stem}.txt", clip.caption.encode())
        store.put_bytes(f"start_frames/{clip.stem}.png", encode_png(video[0]))
    return root


def document(model: Path, clips: Path, out: Path, **training: object) -> dict:
    doc = job_document(model, location(clips / "clips"), location(clips / "start_frames"), location(out),
                       training={"maxSteps": 2, "checkpointEvery": 100, **training},
                       validation={"frames": 5, "resolution": "64x112", "numInferenceSteps": 1, "maxSamples": 1})
    doc["spec"]["datasets"][0]["frameBuckets"] = [9, 5]
    doc["spec"]["training"]["maxBadSampleFraction"] = 0.25
    return with_vae_cache(doc, location(out / "cache/clips"), location(out / "cache/frames"))


def test_the_largest_bucket_a_clip_fills() -> None:
    assert [frame_bucket(n, (5, 9, 17)) for n in (3, 5, 8, 9, 16, 40)] == [None, 5, 5, 9, 9, 17]


def test_preflight_reports_clips_per_bucket_and_names_the_short_ones(tiny_checkpoint: Path, clips: Path,
                                                                   tmp_path: Path) -> None:
    result = run_preflight(parse_job(document(tiny_checkpoint, clips, tmp_path)).spec)
    train_report = result.report.dataset("clips")
    assert train_report.frame_buckets == {9: 2, 5: 2}
    assert train_report.samples == 4
    short = next(p for p in train_report.problems if p.kind.value == "ClipTooShort")
    assert short.examples == ["shape-004.mp4 (3 < 5 frames)"]
    assert "  clips per frame bucket: 5 frames: 2, 9 frames: 2" in result.report.lines()
    assert [e.key for e in result.excluded] == ["shape-004.mp4"]


@pytest.mark.slow
def test_clips_train_at_their_bucket_and_batches_hold_one(tiny_checkpoint: Path, clips: Path, tmp_path: Path,
                                                          trainer_env: None) -> None:
    trained: list[train.StepInfo] = []
    out = tmp_path / "out"
    train.run(parse_job(document(tiny_checkpoint, clips, out, batchSize=2)), train.Hooks(after_step=trained.append))
    assert [info.step for info in trained] == [1, 2]
    samples = trained[0].cache.samples
    # shape-001 (11 frames) trains at 9, shape-003 (8) at 5, shape-004 (3) is left out.
    by_clip = {s.name.split("/")[-1]: s.layout.frames for s in samples}
    assert by_clip == {"shape-000.mp4": 9, "shape-001.mp4": 9, "shape-002.mp4": 5, "shape-003.mp4": 5}
    cache = LocalStore(out / "cache/clips")
    assert {s.layout.frames: read_layout(cache, s.clip.key).frames for s in samples} == {5: 5, 9: 9}
    for epoch in range(3):
        batches = epoch_batches(samples, 2, seed=7, epoch=epoch)
        assert len(batches) == 2 and all(len({s.layout for s in batch}) == 1 for batch in batches)
