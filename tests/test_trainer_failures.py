"""Why a trainer stopped, for each class of storage failure: the exit code, and the reason and the named bucket
in its termination message (what the operator reads from the pod when progress.json could not be written).

Real S3 (SeaweedFS with authentication on); the trainer's `main` in this process, on the tiny checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longcat_job.failures import ExitCode, FailureReason, parse_termination_message
from longcat_job.storage import LocalStore
from longcat_trainer import __main__ as trainer_main
from longcat_trainer.data.synthetic import write_shapes_dataset
from tests.fixtures.cluster import free_port
from tests.fixtures.training import job_document, location

pytestmark = pytest.mark.s3


def run_with_output(tmp_path: Path, tiny_checkpoint: Path, output: dict, monkeypatch: pytest.MonkeyPatch,
                    env: dict[str, str]) -> tuple[int, FailureReason | None, str]:
    write_shapes_dataset(LocalStore(tmp_path / "data"), count=2, frames=9, height=64, width=112)
    document = job_document(tiny_checkpoint, location(tmp_path / "data/clips"),
                            location(tmp_path / "data/start_frames"), output, training={"maxSteps": 1})
    config = tmp_path / "job.json"
    config.write_text(json.dumps(document))
    termination_log = tmp_path / "termination-log"
    termination_log.touch()  # in a pod Kubernetes provides the file
    monkeypatch.setattr(trainer_main, "TERMINATION_LOG", termination_log)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    code = trainer_main.main(["--config", str(config)])
    reason, message = parse_termination_message(termination_log.read_text())
    return code, reason, message


def test_a_missing_output_bucket_is_permanent(tmp_path, tiny_checkpoint, trainer_env, s3_server, monkeypatch):
    output = location("out/", s3=s3_server, bucket="no-such-bucket")
    code, reason, message = run_with_output(tmp_path, tiny_checkpoint, output, monkeypatch,
                                            s3_server.credentials.as_env())
    assert (code, reason) == (ExitCode.CONFIG, FailureReason.NO_SUCH_BUCKET)
    assert "'no-such-bucket'" in message and "does not exist" in message


def test_refused_credentials_are_permanent_and_never_shown(tmp_path, tiny_checkpoint, trainer_env, s3_server,
                                                            s3_bucket, monkeypatch):
    wrong = {"AWS_ACCESS_KEY_ID": s3_server.credentials.access_key_id, "AWS_SECRET_ACCESS_KEY": "not-the-secret-4711"}
    code, reason, message = run_with_output(tmp_path, tiny_checkpoint, location("out/", s3=s3_server, bucket=s3_bucket),
                                            monkeypatch, wrong)
    assert (code, reason) == (ExitCode.CONFIG, FailureReason.ACCESS_DENIED)
    assert f"'{s3_bucket}'" in message and "not-the-secret-4711" not in message


def test_an_unreachable_endpoint_is_worth_a_restart(tmp_path, tiny_checkpoint, trainer_env, s3_server, monkeypatch):
    output = {"s3": {"bucket": "loras", "prefix": "out/", "endpoint": f"http://127.0.0.1:{free_port()}"}}
    code, reason, message = run_with_output(tmp_path, tiny_checkpoint, output, monkeypatch,
                                            s3_server.credentials.as_env())
    assert (code, reason) == (ExitCode.ERROR, FailureReason.ERROR)
    assert "cannot be reached" in message
