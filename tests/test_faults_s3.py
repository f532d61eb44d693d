"""S3 goes away: for 20 s while the trainer caches, for 20 s while it trains and checkpoints, and for good.

The server is the test's own SeaweedFS (`s3_server_private`), really stopped and restarted on the same ports
and data. Datasets, caches and output all live in it. What must hold: an outage shorter than the trainer's
retry budget (`s3.TRAINER`, about a minute) costs no restart and the run ends at the requested step with its
checkpoints whole; a checkpoint is never half-published (`latest` names only checkpoints whose every file is
there); an outage that does not end makes the trainer exit with a code that asks for a restart (not 78) and a
termination message naming the bucket, which the operator shows when it gives up on the gang.
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
from kubernetes.client import (
    V1ContainerState,
    V1ContainerStateTerminated,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodStatus,
)

from longcat_job.failures import ExitCode, FailureReason, parse_termination_message
from longcat_job.progress import TrainerProgress
from longcat_job.s3 import S3AccessError
from longcat_job.storage import S3Store
from longcat_operator import read
from longcat_operator.decide import Observed, final_failure
from longcat_trainer import checkpoint
from longcat_trainer.data.synthetic import write_shapes_dataset
from tests.fixtures.cluster import free_port
from tests.fixtures.operator import wait_for
from tests.fixtures.s3 import S3Server
from tests.fixtures.training import job_document, location, with_vae_cache

pytestmark = [pytest.mark.faults, pytest.mark.s3, pytest.mark.slow]
OUTAGE_S = 20
MAX_STEPS, EVERY = 50, 10
RUN_TIMEOUT_S = 180
# A trainer facing a dead server spends s3.TRAINER's budget (at most 185.6 s of backoff) twice: on its first
# request, then on writing the failure to progress.json.
GIVE_UP_TIMEOUT_S = 2 * 186 + 60
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
        self.termination_log = tmp_path / "termination-log"
        self.termination_log.touch()  # in a pod Kubernetes provides the file
        self.bucket, self.tmp_path, self.attempt = bucket, tmp_path, 0
        self.env = {**os.environ, **s3.credentials.as_env(), "OMP_NUM_THREADS": "1",
                    "LONGCAT_DATA_CACHE": str(tmp_path / "data-cache"),
                    "LONGCAT_TERMINATION_LOG": str(self.termination_log)}
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


def test_trainer_rides_out_20s_outages_while_caching_and_after_a_checkpoint(
    trainer: Trainer, s3_server_private: S3Server
) -> None:
    s3 = s3_server_private
    out = S3Store(s3.client(), trainer.bucket, "out/", what="output")

    # While caching: the server goes the moment the trainer starts encoding (downloads, cache uploads).
    trainer.start()
    wait_for("caching to start", lambda: "to encode" in trainer.log() or trainer.proc.poll() is not None,
             timeout=RUN_TIMEOUT_S, interval=0.05)
    outage(s3)

    # After the first checkpoint: the batches' reads, progress.json and the next checkpoint wait for the server.
    wait_for("the first checkpoint", lambda: latest_step(out) is not None or trainer.proc.poll() is not None,
             timeout=RUN_TIMEOUT_S, interval=0.05)
    assert trainer.proc.poll() is None and latest_step(out) < MAX_STEPS, trainer.log()[-4000:]
    outage(s3)

    assert trainer.wait() == 0, trainer.log()[-4000:]  # one attempt: no restart
    done = TrainerProgress.from_json(out.get_bytes("progress.json"))
    assert done.phase == "Succeeded" and done.progress.step == MAX_STEPS and done.failure is None
    assert published_checkpoints_are_whole(out) == MAX_STEPS
    assert trainer.termination_log.read_text() == ""


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


def failed_pod(name: str, exit_code: int, message: str | None, reason: str = "Error") -> V1Pod:
    """A pod as the API returns it once its trainer container has exited."""
    terminated = V1ContainerStateTerminated(exit_code=exit_code, message=message, reason=reason)
    status = V1ContainerStatus(name="trainer", image="trainer", image_id="", ready=False, restart_count=0,
                               state=V1ContainerState(terminated=terminated))
    return V1Pod(metadata=V1ObjectMeta(name=name), status=V1PodStatus(phase="Failed", container_statuses=[status]))


def test_persistent_outage_fails_naming_the_bucket_in_the_job_status(
    trainer: Trainer, s3_server_private: S3Server
) -> None:
    secret = s3_server_private.credentials.secret_access_key.get_secret_value()
    s3_server_private.stop()
    trainer.start()
    code = trainer.wait(GIVE_UP_TIMEOUT_S)
    assert code not in (ExitCode.OK, ExitCode.CONFIG)
    log = trainer.log()
    assert f"bucket '{trainer.bucket}'" in log and "cannot be reached" in log, log[-3000:]
    assert secret not in log

    # progress.json is out of reach (the operator reads None), the termination message is not.
    message = trainer.termination_log.read_text()
    assert f"output (spec.output): bucket '{trainer.bucket}'" in message and "cannot be reached" in message
    assert secret not in message
    reason, text = parse_termination_message(message)
    assert reason == FailureReason.ERROR  # an outage: worth the restarts
    observed = Observed(exits=read.pod_exits([failed_pod("tiny-a2-0", 1, message)]))
    assert final_failure(2, 2, observed) == (
        "MaxRestartsExceeded", f"the gang failed 3 times (maxRestarts 2); last error: {text}")


def test_given_up_gang_names_the_trainers_failure_else_the_pods() -> None:
    exits = read.pod_exits([failed_pod("tiny-a1-0", 0, None, "Completed"), failed_pod("tiny-a1-1", 137, None, "OOMKilled")])
    assert final_failure(0, 1, Observed(exits=exits)) is None  # a restart is left
    assert final_failure(1, 1, Observed(exits=exits)) == (
        "MaxRestartsExceeded", "the gang failed 2 times (maxRestarts 1); last error: pod tiny-a1-1 exited with "
        "code 137 (OOMKilled): see its log")
    # Rank 0's own report comes first: another pod's trainer may only have seen its peer go.
    reported = TrainerProgress(phase="Failed", failure={"reason": "Error", "message": "RuntimeError: NCCL timeout"},
                               updated="2026-11-25T12:00:00Z")
    assert final_failure(1, 1, Observed(exits=exits, progress=reported))[1] == (
        "the gang failed 2 times (maxRestarts 1); last error: RuntimeError: NCCL timeout")
