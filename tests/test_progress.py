"""progress.json as the operator reads it: camelCase, the status's own Progress and Artifacts, torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime

from longcat_job.api import JobStatus
from longcat_job.progress import Failure, TrainerProgress


def test_round_trip_and_mirror_into_status() -> None:
    doc = TrainerProgress(phase="Failed", failure=Failure(reason="BadInput", message="3 of 4 samples are unusable"),
                          updated=datetime(2026, 1, 1, tzinfo=UTC))
    doc.progress.step, doc.progress.max_steps, doc.progress.loss = 3, 6, 0.5
    doc.artifacts.latest_checkpoint = "s3://b/out/checkpoints/step-00000003/"
    raw = json.loads(doc.to_json())
    assert raw["progress"]["maxSteps"] == 6 and raw["artifacts"]["latestCheckpoint"].endswith("step-00000003/")
    assert raw["failure"] == {"reason": "BadInput", "message": "3 of 4 samples are unusable"}
    back = TrainerProgress.from_json(doc.to_json())
    assert back == doc
    status = JobStatus(progress=back.progress, artifacts=back.artifacts)
    assert JobStatus.model_validate(status.model_dump(by_alias=True)).progress.step == 3


def test_progress_model_imports_without_torch() -> None:
    code = "import sys, longcat_job.progress; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
