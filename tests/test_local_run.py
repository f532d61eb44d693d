"""`longcat-i2v run` on local directories: relative paths, refusals before any process, Ctrl-C and resume.

The command runs as a user runs it (the installed script, in its own process group, Ctrl-C sent to that
group as a terminal does), over the real trainer under torchrun on the CPU.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from longcat_job.failures import ExitCode
from longcat_job.loss_history import LossHistory
from longcat_job.progress import TrainerProgress
from longcat_job.storage import LocalStore, S3Store
from longcat_trainer.commands.run import LATEST_CHECKPOINT_KEY, load_for_run
from longcat_trainer.data.synthetic import write_shapes_dataset
from tests.fixtures.training import job_document, location

CLI = str(Path(sys.executable).with_name("longcat-i2v"))
# Long enough that Ctrl-C, sent when the first checkpoint appears, lands before training ends on a slow machine.
MAX_STEPS = 40
TIME_LIMIT_S = 240


def write_job(folder: Path, model: Path, **training: object) -> Path:
    """A job file whose data and output paths are relative to its own folder (the model path is absolute)."""
    document = job_document(model, location("data/clips"), location("data/start_frames"), location("out"),
                            training={"maxSteps": MAX_STEPS, "checkpointEvery": 4,
                                      "keepCheckpoints": MAX_STEPS // 4 + 2, **training})
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


def cli_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "LONGCAT_DATA_CACHE": str(tmp_path / "data-cache")}


def test_relative_paths_resolve_against_the_job_file(tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    folder.mkdir()
    job_file = write_job(folder, Path("models/tiny"))
    document = yaml.safe_load(job_file.read_text())
    document["spec"]["datasets"][0]["vaeCache"] = {"local": {"path": "file://cache/clips"}}
    document["spec"]["datasets"][1]["vaeCache"] = {"local": {"path": "~/frames-cache"}}
    job_file.write_text(yaml.safe_dump(document))

    spec = load_for_run(job_file).spec
    assert spec.model.source == str(folder / "models/tiny")
    assert spec.datasets[0].source.local.path == str(folder / "data/clips")
    assert spec.datasets[0].vae_cache.local.path == str(folder / "cache/clips")
    assert spec.datasets[1].vae_cache.local.path == str(Path.home() / "frames-cache")
    assert spec.output.local.path == str(folder / "out")

    document["spec"]["model"]["source"] = "hf://meituan-longcat/LongCat-Video"
    job_file.write_text(yaml.safe_dump(document))
    assert load_for_run(job_file).spec.model.source == "hf://meituan-longcat/LongCat-Video"


def test_a_bad_job_is_refused_with_its_field_path_before_anything_starts(tmp_path: Path) -> None:
    job_file = write_job(tmp_path, tmp_path / "model")
    document = yaml.safe_load(job_file.read_text())
    document["spec"]["datasets"][0]["frames"] = 10
    job_file.write_text(yaml.safe_dump(document))

    result = subprocess.run([CLI, "run", str(job_file)], capture_output=True, text=True, timeout=60,
                            env=cli_env(tmp_path))
    assert result.returncode == 1
    assert "job.yaml: spec.datasets[0].frames: frames must satisfy (frames - 1) % 4 == 0" in result.stderr
    assert "trainer log" not in result.stdout  # no torchrun was started ...
    assert not (tmp_path / "out").exists()  # ... and nothing was written


# One hole per kind the deep preflight finds before torchrun starts: a missing file, a clip that is not a
# video, a caption that is not text.
HOLES = {
    "missing start frame": lambda data: (data / "start_frames/shape-001.png").unlink(),
    "0-byte clip": lambda data: (data / "clips/shape-001.mp4").write_bytes(b""),
    "caption not UTF-8": lambda data: (data / "clips/shape-001.txt").write_bytes(b"caf\xe9 at dusk"),
}


@pytest.mark.parametrize("hole", HOLES)
def test_a_bad_sample_is_refused_by_preflight_before_training(tmp_path: Path, hole: str) -> None:
    write_shapes_dataset(LocalStore(tmp_path / "data"), count=2, frames=9, height=64, width=112)
    HOLES[hole](tmp_path / "data")
    job_file = write_job(tmp_path, tmp_path / "model")

    result = subprocess.run([CLI, "run", str(job_file)], capture_output=True, text=True, timeout=60,
                            env=cli_env(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "shape-001" in result.stdout and "preflight found the problems above" in result.stderr
    assert "shape-000" not in result.stdout  # the good sample is not blamed
    assert "trainer log" not in result.stdout
    assert not (tmp_path / "out/manifest.json").exists()


@pytest.mark.s3
def test_run_preflights_s3_datasets_with_the_environment_s_credentials(s3_server, s3_bucket: str,
                                                                        tmp_path: Path) -> None:
    data = S3Store(s3_server.client(), s3_bucket, "run-data/", what="test data")
    write_shapes_dataset(data, count=2, frames=9, height=64, width=112)
    data.client.delete_object(Bucket=s3_bucket, Key="run-data/clips/shape-000.txt")
    document = job_document(tmp_path / "model", location("run-data/clips/", s3=s3_server, bucket=s3_bucket),
                            location("run-data/start_frames/", s3=s3_server, bucket=s3_bucket),
                            location("run-out/", s3=s3_server, bucket=s3_bucket))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")

    result = subprocess.run([CLI, "run", str(tmp_path / "job.yaml")], capture_output=True, text=True, timeout=60,
                            env={**cli_env(tmp_path), **s3_server.credentials.as_env()})
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"s3://{s3_bucket}/run-data/clips/" in result.stdout and "    shape-000.mp4" in result.stdout
    assert "preflight found the problems above" in result.stderr and "trainer log" not in result.stdout
    assert not list(S3Store(s3_server.client(), s3_bucket, "run-out/", what="output").list())


def progress(out: Path) -> TrainerProgress:
    return TrainerProgress.from_json((out / "progress.json").read_bytes())


def wait_for(predicate, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + TIME_LIMIT_S
    while not predicate():
        assert process.poll() is None, f"the run ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {TIME_LIMIT_S}s"
        time.sleep(0.02)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes(tiny_checkpoint: Path, tmp_path: Path) -> None:
    write_shapes_dataset(LocalStore(tmp_path / "data"), count=3, frames=9, height=64, width=112)
    write_job(tmp_path, tiny_checkpoint)
    out = tmp_path / "out"
    command = [CLI, "run", "job.yaml"]  # relative, from the job's folder, as a user types it

    started = time.monotonic()
    first = subprocess.Popen(command, cwd=tmp_path, env=cli_env(tmp_path), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        # The first checkpoint (step 4) proves training is under way: press Ctrl-C, as a terminal does,
        # by signalling the command's process group.
        wait_for(lambda: (out / LATEST_CHECKPOINT_KEY).is_file(), first, "a first checkpoint")
        os.killpg(first.pid, signal.SIGINT)
        stdout, _ = first.communicate(timeout=TIME_LIMIT_S)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert first.returncode == ExitCode.PREEMPTED, stdout
    stopped = progress(out)
    # Ctrl-C came after the checkpoint of step 4: the trainer finished the next step and saved it.
    assert stopped.phase == "Preempted" and 5 <= stopped.progress.step < MAX_STEPS, stdout
    assert f"stopped at step {stopped.progress.step} with a checkpoint" in stdout
    assert json.loads((out / LATEST_CHECKPOINT_KEY).read_text())["step"] == stopped.progress.step
    assert "lora" not in {p.name for p in out.iterdir()}
    kept = {p: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("step-*/state.pt")}
    assert len(kept) >= 2

    second = subprocess.run(command, cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True,
                            timeout=TIME_LIMIT_S)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"resuming from the checkpoint of step {stopped.progress.step}" in second.stdout
    log_file = Path(re.search(r"trainer log: (\S+)", second.stdout).group(1))
    assert f"resuming from checkpoints/step-{stopped.progress.step:08d}/" in log_file.read_text()
    # The steps before the interrupt were not trained again: their checkpoints were not rewritten.
    assert {p: p.stat().st_mtime_ns for p in kept} == kept

    done = progress(out)
    assert done.phase == "Succeeded" and done.progress.step == MAX_STEPS
    lora = out / "lora/pytorch_lora_weights.safetensors"
    assert done.artifacts.lora == lora.as_uri() and load_file(lora)
    assert f"LoRA:          {lora}" in second.stdout
    video = re.search(r"video: +(\S+\.mp4)", second.stdout).group(1)
    assert Path(video).is_file() and f"/validation/step-{MAX_STEPS}/" in video
    assert (out / "index.html").is_file() and (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    # loss.json has every step once across the interrupt, with its learning rate, for the UI's chart.
    history = LossHistory.model_validate_json((out / "loss.json").read_bytes())
    assert history.step == list(range(1, MAX_STEPS + 1)) and len(history.loss) == len(history.lr) == MAX_STEPS
    assert all(v is not None and v > 0 for v in history.lr + history.loss)
    print(f"run, Ctrl-C at step {stopped.progress.step}, resume to {MAX_STEPS}: {time.monotonic() - started:.1f}s")
