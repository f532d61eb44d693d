"""A trainer gang killed mid-run loses at most one checkpoint interval and ends with the LoRA of an unbroken run.

Two `torchrun` groups with `--nnodes 2` and the rendezvous on 127.0.0.1 (the operator's pod command, gloo on
the CPU, the tiny model) train 80 steps with a checkpoint every 10. First one group is SIGKILLed (a lost pod)
half an interval after a checkpoint, and both restart from `latest`: the steps redone are those since that
checkpoint, under one interval. Then both get SIGTERM (the gang's pods deleted) half an interval after the
next checkpoint: the trainer saves the step it is on and exits, losing nothing. A third start finishes. The final LoRA equals that of the same
gang run without faults.

A group whose peer died is stuck in a collective (gloo's timeout is the trainer's two hours); in a cluster the
failed pod fails the Job and the operator deletes the whole gang, which the test does after SURVIVOR_WAIT_S.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from longcat_job.progress import TrainerProgress
from longcat_job.storage import LocalStore
from longcat_trainer.data.synthetic import write_shapes_dataset
from tests.fixtures.faults import Gang
from tests.fixtures.operator import wait_for
from tests.fixtures.training import job_document, location, with_vae_cache

pytestmark = [pytest.mark.faults, pytest.mark.slow]
MAX_STEPS, EVERY = 80, 10
RUN_TIMEOUT_S = 240
SURVIVOR_WAIT_S = 10
SIGTERM_EXIT_S = 60


def make_gang(tiny_checkpoint: Path, data: Path, out: Path, tmp_path: Path, gangs: list[Gang]) -> Gang:
    document = job_document(
        tiny_checkpoint, location(data / "clips"), location(data / "start_frames"), location(out),
        training={"maxSteps": MAX_STEPS, "checkpointEvery": EVERY}, resources={"nodes": 2, "gpusPerNode": 1},
    )
    with_vae_cache(document, location(tmp_path / "cache/clips"), location(tmp_path / "cache/frames"))
    config = tmp_path / f"{out.name}.json"
    config.write_text(json.dumps(document))
    logs = tmp_path / f"logs-{out.name}"
    logs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LONGCAT_DATA_CACHE": str(tmp_path / "data-cache")}
    gang = Gang(document, config, logs, env)
    gangs.append(gang)
    return gang


def latest(out: Path) -> int:
    return json.loads((out / "checkpoints/latest").read_text())["step"]


def progress(out: Path) -> TrainerProgress:
    return TrainerProgress.from_json((out / "progress.json").read_bytes())


def logs(gang: Gang) -> str:
    return "\n".join(gang.log(node) for node in range(gang.nodes))


def run_to_end(gang: Gang) -> None:
    gang.start()
    codes = gang.wait(RUN_TIMEOUT_S)
    assert codes == [0, 0], f"exit codes {codes}:\n{logs(gang)[-6000:]}"


def wait_between_checkpoints(gang: Gang, out: Path, first: int, second: int) -> float:
    """Waits until `latest` names step `second`, having seen `first`; returns the seconds between the two."""
    def at(step: int) -> Any:
        def probe() -> bool:
            assert gang.running(), f"the gang exited early:\n{logs(gang)[-6000:]}"
            return (out / "checkpoints/latest").exists() and latest(out) >= step

        return probe

    wait_for(f"checkpoint {first}", at(first), timeout=RUN_TIMEOUT_S, interval=0.01)
    assert latest(out) == first
    seen_first = time.monotonic()
    wait_for(f"checkpoint {second}", at(second), timeout=RUN_TIMEOUT_S, interval=0.01)
    assert latest(out) == second, "watching checkpoints missed one"
    return time.monotonic() - seen_first


def test_two_node_gang_resumes_after_sigkill_and_sigterm(
    tiny_checkpoint: Path, tmp_path: Path, gangs: list[Gang]
) -> None:
    data = tmp_path / "data"
    write_shapes_dataset(LocalStore(data), count=4, frames=9, height=64, width=112)

    straight_out = tmp_path / "straight"
    run_to_end(make_gang(tiny_checkpoint, data, straight_out, tmp_path, gangs))
    straight = progress(straight_out)
    assert straight.phase == "Succeeded" and straight.world_size == 2 and straight.progress.step == MAX_STEPS

    out = tmp_path / "faulty"
    gang = make_gang(tiny_checkpoint, data, out, tmp_path, gangs)

    # 1. SIGKILL of node 1 half an interval after the second checkpoint, while it trains. Checkpoints are
    # watched on disk: a trainer busy with its steps answers /metrics too late to time a kill by.
    gang.start()
    interval_s = wait_between_checkpoints(gang, out, EVERY, 2 * EVERY)  # a fresh output: no `latest` yet
    time.sleep(interval_s / 2)
    gang.kill_node(1)
    killed_at = time.monotonic()
    assert not (out / "lora").exists(), "killed too late: the run had finished"
    resume_from = latest(out)
    survivor = gang.wait(SURVIVOR_WAIT_S)[0]
    survivor_s = time.monotonic() - killed_at
    assert survivor != 0, f"node 0 finished without its peer:\n{gang.log(0)[-4000:]}"
    gang.kill_node(0)  # the operator deletes the failed gang
    gang.wait(SURVIVOR_WAIT_S)
    assert latest(out) == resume_from and resume_from % EVERY == 0 and 2 * EVERY <= resume_from < MAX_STEPS

    # 2. Both nodes restart from `latest`; SIGTERM to both half an interval after their second checkpoint.
    gang.start()
    interval_s = wait_between_checkpoints(gang, out, resume_from + EVERY, resume_from + 2 * EVERY)
    time.sleep(interval_s / 2)
    assert not (out / "lora").exists(), "SIGTERM too late: the run had finished"
    for node in range(gang.nodes):
        gang.terminate(node)
    codes = gang.wait(SIGTERM_EXIT_S)
    assert None not in codes and codes != [0, 0], f"after SIGTERM: {codes}\n{logs(gang)[-6000:]}"
    assert f"(step {resume_from})" in gang.log(0)  # "resuming from checkpoints/step-…/ (step N)"
    stopped = progress(out)
    assert stopped.phase == "Preempted", stopped
    preempted_at = stopped.progress.step
    assert resume_from + 2 * EVERY <= preempted_at < MAX_STEPS and latest(out) == preempted_at  # SIGTERM loses no step
    assert "SIGTERM: saving a checkpoint" in logs(gang)

    # 3. The third attempt finishes from the step SIGTERM saved.
    run_to_end(gang)
    assert f"(step {preempted_at})" in gang.log(0)
    done = progress(out)
    assert done.phase == "Succeeded" and done.progress.step == MAX_STEPS and latest(out) == MAX_STEPS
    survived = "still running" if survivor is None else f"exit {survivor}"
    print(f"SIGKILL half an interval after step {resume_from}: resumed from {resume_from} (interval {EVERY}); "
          f"node 0 {survived} {survivor_s:.1f}s later; SIGTERM at step {preempted_at}: resumed from {preempted_at}")

    a = load_file(straight_out / "lora/pytorch_lora_weights.safetensors")
    b = load_file(out / "lora/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) == 20
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), (key, (a[key] - b[key]).abs().max())
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # it trained: B left zero
    # The loss history in the last checkpoint has each step once, in order: no step counted twice.
    state = torch.load(out / f"checkpoints/step-{MAX_STEPS:08d}/state.pt", weights_only=False)
    assert [step for step, *_ in state["loss_history"]] == list(range(1, MAX_STEPS + 1))
