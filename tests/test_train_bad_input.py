"""Unusable samples are skipped, named and counted; above maxBadSampleFraction the job fails with exit code 78."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from longcat_job.failures import ExitCode
from longcat_job.parse import parse_job
from longcat_job.preflight import run_preflight
from longcat_job.progress import TrainerProgress
from longcat_job.sample_manifest import build_manifest, write_manifest
from longcat_job.storage import LocalStore
from longcat_trainer import __main__ as trainer_main
from longcat_trainer.__main__ import main
from longcat_trainer.data.synthetic import ShapeClip, encode_mp4, render, write_shapes_dataset
from tests.fixtures.training import job_document, location, with_vae_cache

pytestmark = pytest.mark.slow


def bad_dataset(root: Path) -> None:
    """3 good samples and 4 bad ones, each bad in its own way."""
    write_shapes_dataset(LocalStore(root), count=3, frames=9, height=64, width=112)
    clips, frames = root / "clips", root / "start_frames"
    good_frame = np.asarray(Image.open(frames / "shape-000.png"))
    (clips / "corrupt.mp4").write_bytes(b"this is not a video " * 50)
    (frames / "corrupt.png").write_bytes((frames / "shape-000.png").read_bytes())
    (clips / "small-frame.mp4").write_bytes((clips / "shape-001.mp4").read_bytes())
    Image.fromarray(good_frame).resize((56, 32)).save(frames / "small-frame.png")
    (clips / "blank-caption.mp4").write_bytes((clips / "shape-002.mp4").read_bytes())
    (frames / "blank-caption.png").write_bytes((frames / "shape-002.png").read_bytes())
    (clips / "blank-caption.txt").write_text("  \n\t\n")  # not empty to a listing, empty to a reader
    short = render(ShapeClip("short", "red", "blue", "up", True), 5, 64, 112)
    (clips / "short.mp4").write_bytes(encode_mp4(short, fps=16))
    Image.fromarray(short[0]).save(frames / "short.png")
    for stem in ("corrupt", "small-frame", "short"):
        (clips / f"{stem}.txt").write_text("a red square")


def run_job(root: Path, out: str, fraction: float, config: Path, *, shallow_manifest: bool = False
            ) -> tuple[int, TrainerProgress]:
    """The trainer on the bad dataset; `shallow_manifest` freezes the samples first without the deep check (as
    an older manifest would), so that only the trainer's own decoding can find the bad ones."""
    document = job_document(
        root / "ckpt", location(root / "data/clips"), location(root / "data/start_frames"), location(root / out),
        training={"maxSteps": 2, "checkpointEvery": 2, "maxBadSampleFraction": fraction},
    )
    with_vae_cache(document, location(root / "cache/clips"), location(root / "cache/frames"))
    if shallow_manifest:
        job = parse_job(document)
        write_manifest(LocalStore(root / out), build_manifest("tiny", job.spec, run_preflight(job.spec, deep=False)))
    config.write_text(json.dumps(document))
    code = main(["--config", str(config)])
    return code, TrainerProgress.from_json((root / out / "progress.json").read_bytes())


def test_preflight_leaves_bad_samples_out_then_refuses_above_the_fraction(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, trainer_env: None
) -> None:
    (tmp_path / "ckpt").symlink_to(tiny_checkpoint)
    bad_dataset(tmp_path / "data")
    caplog.set_level(logging.WARNING)

    code, tolerated = run_job(tmp_path, "out-a", 0.6, tmp_path / "a.json")  # 4 of 7 bad: 0.57
    assert code == 0 and tolerated.phase == "Succeeded"
    bad = tolerated.bad_samples
    assert (bad.count, bad.total) == (4, 7)
    assert tolerated.cache.misses == 3 * 3 + 1  # only the 3 good samples cached (and the empty prompt)
    assert sorted(e.split(": ", 2)[1] for e in bad.examples) == [
        "ClipTooShort", "ClipUnreadable", "EmptyCaption", "StartFrameSizeMismatch"]
    assert any(e.startswith("clips/corrupt.mp4: ClipUnreadable: corrupt.mp4 (") for e in bad.examples)
    assert any("small-frame.png (56x32, its clip small-frame.mp4 is 112x64)" in e for e in bad.examples)
    for name in ("corrupt.mp4", "small-frame.png", "blank-caption.txt", "short.mp4"):
        assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), name
    assert (tmp_path / "out-a/lora/pytorch_lora_weights.safetensors").exists()

    code, failed = run_job(tmp_path, "out-b", 0.5, tmp_path / "b.json")
    assert code == ExitCode.CONFIG
    assert failed.phase == "Failed" and failed.failure is not None and failed.failure.reason == "BadInput"
    assert "4 of 7 samples are unusable" in failed.failure.message
    assert "maxBadSampleFraction 0.5" in failed.failure.message and "corrupt.mp4" in failed.failure.message
    assert failed.cache.misses == 0  # refused before anything was decoded
    assert not (tmp_path / "out-b/lora").exists()


def test_the_trainer_still_skips_and_names_what_only_decoding_finds(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, trainer_env: None
) -> None:
    (tmp_path / "ckpt").symlink_to(tiny_checkpoint)
    bad_dataset(tmp_path / "data")
    caplog.set_level(logging.WARNING, logger="longcat_trainer")

    code, tolerated = run_job(tmp_path, "out-a", 0.6, tmp_path / "a.json", shallow_manifest=True)
    assert code == 0 and tolerated.phase == "Succeeded"
    bad = tolerated.bad_samples
    assert (bad.count, bad.total, bad.too_short) == (4, 7, 1)
    assert len(bad.examples) == 4  # each names its file, the too-short clip included
    assert any(e.startswith("clips/corrupt.mp4: PyAV cannot decode") for e in bad.examples)
    assert any("small-frame.png: start frame is 56x32" in e for e in bad.examples)
    assert any("blank-caption.txt: empty caption" in e for e in bad.examples)
    assert any("short.mp4: 5 frames" in e for e in bad.examples)
    for name in ("corrupt.mp4", "small-frame.mp4", "blank-caption.mp4", "short.mp4"):
        assert any(name in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records), name

    code, failed = run_job(tmp_path, "out-b", 0.5, tmp_path / "b.json", shallow_manifest=True)
    assert code == ExitCode.CONFIG and failed.failure.reason == "BadInput"
    assert "4 of 7 samples are unusable" in failed.failure.message
    assert "maxBadSampleFraction=0.5" in failed.failure.message
    assert "corrupt.mp4" in failed.failure.message and "short.mp4" in failed.failure.message  # names, not counts
    assert failed.cache.misses == 0  # the bad markers of the first run were reused: nothing decoded again


def test_invalid_job_file_exits_78(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    termination_log = tmp_path / "termination-log"
    termination_log.touch()  # in a pod Kubernetes provides the file
    monkeypatch.setattr(trainer_main, "TERMINATION_LOG", termination_log)
    monkeypatch.setenv("LONGCAT_EXIT_CODE_FILE", str(tmp_path / "exit-code"))
    config = tmp_path / "job.json"
    config.write_text(json.dumps({"apiVersion": "longcat.video/v1alpha1", "kind": "LongCatI2VJob",
                                  "spec": {"datasets": [], "output": {"local": {"path": str(tmp_path)}}}}))
    assert main(["--config", str(config)]) == ExitCode.CONFIG
    assert "spec.datasets" in caplog.text
    assert "spec.datasets" in termination_log.read_text()
    assert (tmp_path / "exit-code").read_text() == str(ExitCode.CONFIG)
