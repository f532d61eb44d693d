"""Checkpoints in a local directory and in S3: published by the latest pointer, pruned to the newest K."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from longcat_job.storage import LocalStore, ObjectStore, S3Store
from longcat_trainer import checkpoint


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    server = request.getfixturevalue("s3_server")
    return S3Store(server.client(), server.create_bucket(), "jobs/a/", what="output")


def steps_on_store(store: ObjectStore) -> list[str]:
    return sorted({r.key.split("/")[1] for r in store.list() if r.key.startswith("checkpoints/step-")})


def test_latest_pointer_and_pruning(store: ObjectStore) -> None:
    assert checkpoint.load_latest(store) is None
    for step in range(1, 5):
        checkpoint.save(store, step, {"step": step, "w": torch.full((2,), float(step))}, {"lora.bin": b"x"}, keep=2)
    assert steps_on_store(store) == ["step-00000003", "step-00000004"]
    state = checkpoint.load_latest(store)
    assert state["step"] == 4 and torch.equal(state["w"], torch.full((2,), 4.0))
    # A checkpoint whose writer died before publishing is never read.
    store.put_bytes(checkpoint.step_prefix(5) + "lora.bin", b"partial")
    assert checkpoint.load_latest(store)["step"] == 4


def test_signals_ask_for_a_checkpoint_and_a_second_ctrl_c_stops_at_once() -> None:
    before = signal.getsignal(signal.SIGINT)
    with checkpoint.Preemption() as preemption:
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
