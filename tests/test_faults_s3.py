"""S3 goes away: for 20 s while the trainer caches, for 20 s while it trains and checkpoints, and for good.

The server is the test's own SeaweedFS (`s3_server_private`), really stopped and restarted on the same ports
and data. Datasets, caches and output all live in it. What must hold: a checkpoint is never half-published
(`latest` names only checkpoints whose every file is there), a trainer that gives up exits with a code that
asks for a restart (not 78), the restarted trainer resumes from `latest` and ends at the requested step, and
an outage that does not end fails with a message naming the bucket.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from longcat_operator.progress import EXIT_CONFIG_ERROR, TrainerProgress
from longcat_operator.s3 import S3AccessError
from longcat_operator.storage import S3Store
from longcat_trainer import checkpoint
from longcat_trainer.data.synthetic import write_shapes_dataset
from tests.fixtures.operator import wait_for
from tests.fixtures.s3 import S3Server
from tests.fixtures.cluster import free_port
from tests.fixtures.training import job_document, location, with_vae_cache

pytestmark = [pytest.mark.faults, pytest.mark.s3, pytest.mark.slow]
OUTAGE_S = 20
MAX_STEPS, EVERY = 50, 10
RUN_TIMEOUT_S = 180
CHECKPOINT_FILES = {checkpoint.STATE, "pytorch_lora_weights.safetensors", "adapter_config.json",
                    "longcat_video_lora.safetensors"}


class Trainer:
    """One trainer process (what a one-GPU pod runs) on a job in the test's S3 server."""

    def __init__(self, s3: S3Server, bucket: str, model: Path, tmp_path: Path) -> None:
        document = job_document(
            model, location("data/clips/", s3=s3, bucket=bucket), location("data/start_frames/", s3=s3, bucket=bucket),
            location("out/", s3=s3, bucket=bucket), training={"maxSteps": MAX_STEPS, "checkpointEvery": EVERY},
        )
        with_vae_cache(document, *(location(f"cache/{d}/", s3=s3, bucket=bucket) for d in ("clips", "frames")))
        self.config = tmp_path / "job.json"
        self.config.write_text(json.dumps(document))
        self.bucket, self.tmp_path, self.attempt = bucket, tmp_path, 0
        self.env = {**os.environ, **s3.credentials.as_env(), "OMP_NUM_THREADS": "1",
                    "LONGCAT_DATA_CACHE": str(tmp_path / "data-cache")}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.attempt += 1
        env = {**self.env, "LONGCAT_METRICS_PORT": str(free_port())}
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "longcat_trainer", "--config", str(self.config)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def log_path(self) -> Path:
        return self.tmp_path / f"trainer-{self.attempt}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the trainer ran past {timeout}s:\n{self.log()[-4000:]}") from None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def trainer(s3_server_private: S3Server, tiny_checkpoint: Path, tmp_path: Path) -> Any:
    s3 = s3_server_private
    bucket = s3.create_bucket()
    write_shapes_dataset(S3Store(s3.client(), bucket, "data/", what="test data"), count=3, frames=9, height=64,
                         width=112)
    made = Trainer(s3, bucket, tiny_checkpoint, tmp_path)
    yield made
    made.close()


def outage(s3: S3Server, seconds: float = OUTAGE_S) -> None:
    s3.stop()
    time.sleep(seconds)
    s3.start()


def latest_step(out: S3Store) -> int | None:
    try:
        return json.loads(out.get_bytes(checkpoint.LATEST))["step"]
    except S3AccessError:  # none yet
        return None


def published_checkpoints_are_whole(out: S3Store) -> int | None:
    """The step `latest` names (None without one), after checking every file of that checkpoint is there."""
    keys = {r.key for r in out.list()}
    if checkpoint.LATEST not in keys:
        return None
    pointer = json.loads(out.get_bytes(checkpoint.LATEST))
    present = {k.removeprefix(pointer["prefix"]) for k in keys if k.startswith(pointer["prefix"])}
    assert CHECKPOINT_FILES <= present, (pointer, present)
    return pointer["step"]


def test_trainer_survives_20s_outages_while_caching_and_while_checkpointing(
    trainer: Trainer, s3_server_private: S3Server
) -> None:
    s3 = s3_server_private
    out = S3Store(s3.client(), trainer.bucket, "out/", what="output")
    outcomes: list[str] = []

    # 1. While caching: the server goes the moment the trainer starts encoding.
    trainer.start()
    wait_for("caching to start", lambda: "to encode" in trainer.log() or trainer.proc.poll() is not None,
             timeout=RUN_TIMEOUT_S, interval=0.05)
    outage(s3)
    code = trainer.wait()
    outcomes.append(f"caching outage: exit {code}")
    assert code != EXIT_CONFIG_ERROR, trainer.log()[-4000:]  # an outage is never the job's fault
    if code != 0:
        assert "cannot be reached" in trainer.log() and trainer.bucket in trainer.log()
        assert published_checkpoints_are_whole(out) is None  # it never got as far as training

        # 2. The restarted trainer reuses what was cached; the server goes after the first checkpoint.
        trainer.start()
        wait_for("the first checkpoint", lambda: latest_step(out) is not None or trainer.proc.poll() is not None,
                 timeout=RUN_TIMEOUT_S, interval=0.05)
        assert trainer.proc.poll() is None and latest_step(out) < MAX_STEPS, trainer.log()[-4000:]
        outage(s3)
        code = trainer.wait()
        outcomes.append(f"training outage: exit {code}")
        assert code != EXIT_CONFIG_ERROR, trainer.log()[-4000:]
    if code != 0:
        resume_from = published_checkpoints_are_whole(out)
        assert resume_from is not None and resume_from >= EVERY

        # 3. The next restart resumes from the whole checkpoint and finishes.
        trainer.start()
        assert trainer.wait() == 0, trainer.log()[-4000:]
        assert f"(step {resume_from})" in trainer.log()
    done = TrainerProgress.from_json(out.get_bytes("progress.json"))
    assert done.phase == "Succeeded" and done.progress.step == MAX_STEPS
    assert published_checkpoints_are_whole(out) == MAX_STEPS
    assert done.cache.misses == 0 or trainer.attempt == 1  # a restart re-encodes nothing already cached
    print("; ".join(outcomes))


def test_checkpoint_is_never_half_published(s3_server_private: S3Server) -> None:
    """The server dies between a checkpoint's files: `latest` still names the previous, whole checkpoint."""
    s3 = s3_server_private
    bucket = s3.create_bucket()
    fast_fail = s3.client(max_attempts=1, connect_timeout=1)

    class DyingStore(S3Store):
        def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
            if key.endswith(checkpoint.STATE) and "00000002" in key:
                s3.stop()  # the server goes after the LoRA files of step 2 and before its state
            super().put_bytes(key, data, content_type)

    store = DyingStore(fast_fail, bucket, "out/", what="output")
    files = {name: name.encode() for name in CHECKPOINT_FILES - {checkpoint.STATE}}
    checkpoint.save(store, 1, {"step": 1}, files, keep=3)
    with pytest.raises(S3AccessError, match=f"bucket '{bucket}'.*cannot be reached"):
        checkpoint.save(store, 2, {"step": 2}, files, keep=3)
    s3.start()
    out = S3Store(s3.client(), bucket, "out/", what="output")
    assert published_checkpoints_are_whole(out) == 1
    assert checkpoint.load_latest(out) == {"step": 1}
    assert any(r.key.startswith(checkpoint.step_prefix(2)) for r in out.list())  # the orphan nobody reads


def test_persistent_outage_fails_naming_the_bucket(trainer: Trainer, s3_server_private: S3Server) -> None:
    s3_server_private.stop()
    trainer.start()
    code = trainer.wait()
    assert code not in (0, EXIT_CONFIG_ERROR)
    log = trainer.log()
    assert f"bucket '{trainer.bucket}'" in log and "cannot be reached" in log, log[-3000:]
    assert s3_server_private.credentials.secret_access_key.get_secret_value() not in log
