"""The operator's decisions as data: (spec, status, observed) -> (status, actions), without a cluster.

The handlers that read and apply these decisions run against the real API server in test_operator.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest

from longcat_job.api import DatasetStatus, JobSpec, JobStatus, Phase
from longcat_job.failures import FailureReason
from longcat_job.parse import parse_job
from longcat_job.progress import Failure, TrainerProgress
from longcat_operator import status as transitions
from longcat_operator.decide import (
    Attempt,
    CountRestart,
    CreateAttempt,
    Decision,
    DeleteAttempts,
    DeleteGang,
    Emit,
    Observed,
    PodExit,
    Preflight,
    Refusal,
    SetSuspended,
    decide,
)

GENERATION = 1
DATASETS = [DatasetStatus(id="clips", objects=6, samples=3), DatasetStatus(id="frames", objects=3)]


def spec(**overrides: object) -> JobSpec:
    where = {"s3": {"bucket": "data", "prefix": "x/", "credentialsSecret": "s3"}}
    document = {
        "apiVersion": "longcat.video/v1alpha1", "kind": "LongCatI2VJob", "metadata": {"name": "job"},
        "spec": {"datasets": [{"id": "clips", "type": "video", "isI2V": True, "source": where,
                               "conditioningData": ["frames"]},
                              {"id": "frames", "type": "conditioning", "source": where}],
                 "output": where, "resources": {"nodes": 2}, "maxRestarts": 2, **overrides},
    }
    return parse_job(document).spec


def fresh() -> JobStatus:
    return JobStatus()


def validating() -> JobStatus:
    return transitions.validating(fresh(), GENERATION)


def launched(restarts: int = 0, phase: Phase = Phase.LAUNCHING) -> JobStatus:
    status = transitions.launched(validating(), GENERATION, datasets=DATASETS, manifest="s3://data/x/manifest.json",
                                  gang="job-a0", nodes=2, suspended=False)
    return status.model_copy(update={"restarts": restarts, "phase": phase})


def suspended() -> JobStatus:
    return transitions.suspending(launched(), GENERATION)


def progress(phase: str = "Training", step: int = 4, failure: Failure | None = None) -> TrainerProgress:
    return TrainerProgress(phase=phase, progress={"step": step, "maxSteps": 10, "loss": 0.25}, failure=failure,
                           updated="2026-11-25T12:00:00Z")


RUNNING = Attempt()
FAILED = Attempt(failed=True)
# The transitions stamp whole seconds of the real clock; the timed cases reckon from there.
NOW = transitions.now()


def later(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def finished(phase: Phase = Phase.SUCCEEDED) -> JobStatus:
    return launched(0, phase).model_copy(update={"completion_time": NOW})


@dataclass(frozen=True)
class Case:
    id: str
    status: JobStatus
    observed: Observed
    phase: Phase | None
    actions: tuple = ()  # events by their reason
    restarts: int = 0
    # condition type -> (status, reason) that must hold afterwards
    conditions: dict[str, tuple[str, str]] = field(default_factory=dict)
    spec: JobSpec = field(default_factory=spec)
    needs_preflight: bool = False
    unchanged: bool = False  # nothing to write either


CASES = [
    Case("new job: validated, preflight next", fresh(), Observed(), Phase.VALIDATING,
         conditions={"Validated": ("True", "Valid")}, needs_preflight=True),
    Case("invalid spec: failed, no gang", fresh(), Observed(refusal=Refusal("Validated", "InvalidSpec", "bad")),
         Phase.FAILED, ("InvalidSpec",), conditions={"Validated": ("False", "InvalidSpec"),
                                                            "Failed": ("True", "InvalidSpec")}),
    Case("preflight failed: DatasetReady False, no gang", validating(),
         Observed(preflight=Preflight(DATASETS, refusal=Refusal("DatasetReady", "PreflightFailed", "city.mp4",
                                                               DATASETS))),
         Phase.FAILED, ("PreflightFailed",), conditions={"DatasetReady": ("False", "PreflightFailed")}),
    Case("launch: attempt 0 created", validating(), Observed(preflight=Preflight(DATASETS, "s3://m")),
         Phase.LAUNCHING, (CreateAttempt(0), "Launched"),
         conditions={"DatasetReady": ("True", "PreflightPassed"), "Launched": ("True", "GangCreated")}),
    Case("launch suspended", validating(), Observed(preflight=Preflight(DATASETS, "s3://m")), Phase.SUSPENDED,
         (CreateAttempt(0), "Launched"), spec=spec(suspend=True)),
    Case("pods starting", launched(), Observed(attempts={0: RUNNING}, running_pods=1), Phase.LAUNCHING),
    Case("all pods running, trainer caching", launched(), Observed(attempts={0: RUNNING}, running_pods=2,
                                                                   progress=progress("Caching", 0)),
         Phase.CACHING, ("Caching",), conditions={"Running": ("True", "AllPodsRunning")}),
    Case("progress: training", launched(phase=Phase.CACHING),
         Observed(attempts={0: RUNNING}, running_pods=2, progress=progress()), Phase.TRAINING, ("Training",)),
    Case("pod failure: restart raised, nothing created yet", launched(phase=Phase.TRAINING),
         Observed(attempts={0: FAILED}, exits=(PodExit("job-a0-1", 137, "OOMKilled"),), progress=progress()),
         Phase.LAUNCHING, ("GangRestarted", CountRestart(), "Launching"), restarts=1,
         conditions={"Running": ("False", "GangRestarted")}),
    Case("restart, second half: create the new attempt, then delete the old", launched(1),
         Observed(attempts={0: FAILED}), Phase.LAUNCHING, (CreateAttempt(1), DeleteAttempts((0,))), restarts=1),
    Case("old attempt still there while the new one runs", launched(1),
         Observed(attempts={0: FAILED, 1: RUNNING}, running_pods=2), Phase.CACHING,
         ("Caching", DeleteAttempts((0,))), restarts=1),
    Case("trainer done, Job not yet complete: still Training", launched(phase=Phase.TRAINING),
         Observed(attempts={0: RUNNING}, running_pods=2, progress=progress("Succeeded", 10)), Phase.TRAINING),
    Case("a pod has ended, the Job's condition not there yet: phase kept", launched(phase=Phase.TRAINING),
         Observed(attempts={0: RUNNING}, running_pods=1, progress=progress("Succeeded", 10)), Phase.TRAINING),
    Case("stale status (a newer attempt exists): nothing", launched(0, Phase.TRAINING),
         Observed(attempts={1: RUNNING}, running_pods=2, progress=progress()), Phase.TRAINING, unchanged=True),
    Case("Job deleted by someone: recreated", launched(0, Phase.TRAINING), Observed(attempts={}), Phase.TRAINING,
         (CreateAttempt(0), "GangRecreated")),
    Case("max restarts: failed", launched(2, Phase.TRAINING),
         Observed(attempts={2: FAILED}, exits=(PodExit("job-a2-0", 1, message="RuntimeError: NCCL"),)),
         Phase.FAILED, ("MaxRestartsExceeded", "Failed"), restarts=2,
         conditions={"Failed": ("True", "MaxRestartsExceeded")}),
    Case("trainer-reported bad input: failed without restart", launched(0, Phase.TRAINING),
         Observed(attempts={0: FAILED}, exits=(PodExit("job-a0-0", 1),),
                  progress=progress("Failed", failure=Failure(reason="BadInput", message="3 of 3 unusable"))),
         Phase.FAILED, ("BadInput", "Failed"), conditions={"Failed": ("True", "BadInput")}),
    Case("trainer-reported error: restarts", launched(0, Phase.TRAINING),
         Observed(attempts={0: FAILED}, progress=progress("Failed", failure=Failure(reason="Error", message="x"))),
         Phase.LAUNCHING, ("GangRestarted", CountRestart(), "Launching"), restarts=1),
    Case("exit code 78 without progress.json: bad input", launched(0, Phase.TRAINING),
         Observed(attempts={0: FAILED}, exits=(PodExit("job-a0-0", 78, message="clips/a.mp4: unreadable"),)),
         Phase.FAILED, ("BadInput", "Failed"), conditions={"Failed": ("True", "BadInput")}),
    # The output bucket refused: no progress.json, the termination message carries the reason.
    Case("termination message AccessDenied: failed without restart", launched(0, Phase.TRAINING),
         Observed(attempts={0: FAILED}, exits=(PodExit("job-a0-0", 1, message="output: bucket 'b' denied access",
                                                       failure=FailureReason.ACCESS_DENIED),)),
         Phase.FAILED, ("AccessDenied", "Failed"), conditions={"Failed": ("True", "AccessDenied")}),
    Case("termination message NoSuchBucket: failed without restart", launched(0, Phase.TRAINING),
         Observed(attempts={0: FAILED}, exits=(PodExit("job-a0-0", 1, message="bucket 'b' does not exist",
                                                       failure=FailureReason.NO_SUCH_BUCKET),)),
         Phase.FAILED, ("NoSuchBucket", "Failed"), conditions={"Failed": ("True", "NoSuchBucket")}),
    Case("termination message Error (S3 unreachable): restarts", launched(0, Phase.TRAINING),
         Observed(attempts={0: FAILED}, exits=(PodExit("job-a0-0", 1, message="S3 cannot be reached",
                                                       failure=FailureReason.ERROR),)),
         Phase.LAUNCHING, ("GangRestarted", CountRestart(), "Launching"), restarts=1),
    Case("complete: succeeded", launched(0, Phase.TRAINING),
         Observed(attempts={0: Attempt(complete=True)}, progress=progress("Succeeded", 10)), Phase.SUCCEEDED,
         ("Succeeded", "Succeeded"), conditions={"Complete": ("True", "Succeeded")}),
    Case("suspend requested: the Job suspended", launched(0, Phase.TRAINING),
         Observed(attempts={0: RUNNING}, running_pods=2, suspend_request=True), Phase.SUSPENDED,
         (SetSuspended(0, True), "Suspended"), conditions={"Suspended": ("True", "JobSuspended")}),
    Case("suspended Job: phase Suspended", suspended(),
         Observed(attempts={0: Attempt(suspended=True)}), Phase.SUSPENDED, unchanged=True),
    Case("resume requested: the Job resumed", suspended(),
         Observed(attempts={0: Attempt(suspended=True)}, suspend_request=False), Phase.LAUNCHING,
         (SetSuspended(0, False), "Resumed"), conditions={"Suspended": ("False", "JobResumed")}),
    Case("suspend replayed for a Job already suspended: nothing", suspended(),
         Observed(attempts={0: Attempt(suspended=True)}, suspend_request=True), Phase.SUSPENDED, unchanged=True),
    Case("TTL not yet expired: nothing", finished(), Observed(attempts={0: Attempt(complete=True)}, now=later(9)),
         Phase.SUCCEEDED, spec=spec(ttlSecondsAfterFinished=10), unchanged=True),
    Case("TTL expired: the gang deleted, the job kept", finished(Phase.FAILED),
         Observed(attempts={0: FAILED, 1: FAILED}, now=later(10)), Phase.FAILED,
         (DeleteGang((0, 1)), "TTLExpired"), spec=spec(ttlSecondsAfterFinished=10),
         conditions={"GangDeleted": ("True", "TTLExpired")}),
    Case("no TTL: a finished gang stays", finished(), Observed(attempts={0: Attempt(complete=True)}, now=later(10**6)),
         Phase.SUCCEEDED, unchanged=True),
    Case("deadline not reached: runs on", launched(0, Phase.TRAINING).model_copy(update={"start_time": NOW}),
         Observed(attempts={0: RUNNING}, running_pods=2, now=later(59)), Phase.TRAINING,
         spec=spec(activeDeadlineSeconds=60)),
    Case("deadline passed: the gang stopped, Failed DeadlineExceeded", launched(1, Phase.TRAINING).model_copy(
        update={"start_time": NOW}), Observed(attempts={1: RUNNING}, running_pods=2, now=later(60)), Phase.FAILED,
         (DeleteAttempts((1,)), "DeadlineExceeded", "Failed"), restarts=1, spec=spec(activeDeadlineSeconds=60),
         conditions={"Failed": ("True", "DeadlineExceeded")}),
    Case("deadline while suspended: the clock waits", suspended().model_copy(
        update={"start_time": NOW}), Observed(attempts={0: Attempt(suspended=True)}, now=later(600)),
         Phase.SUSPENDED, spec=spec(activeDeadlineSeconds=60), unchanged=True),
    Case("finished: nothing more", transitions.succeeded(launched(), GENERATION),
         Observed(attempts={0: Attempt(complete=True)}), Phase.SUCCEEDED, unchanged=True),
]


def summary(decision: Decision) -> tuple:
    """Actions with events reduced to their reasons."""
    return tuple(a.reason if isinstance(a, Emit) else a for a in decision.actions)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_decide(case: Case) -> None:
    decision = decide("job", case.spec, case.status, case.observed, GENERATION)
    assert decision.status.phase == case.phase
    assert summary(decision) == case.actions
    assert decision.status.restarts == case.restarts
    assert decision.needs_preflight == case.needs_preflight
    for type_, (state, reason) in case.conditions.items():
        found = transitions.condition(decision.status, type_)
        assert found is not None and (found.status, found.reason) == (state, reason), decision.status.conditions
    if case.unchanged:
        assert decision.status == case.status


def test_progress_is_mirrored_with_a_step_for_kubectl() -> None:
    decision = decide("job", spec(), launched(0, Phase.TRAINING),
                      Observed(attempts={0: RUNNING}, running_pods=2, progress=progress(step=7)), GENERATION)
    assert decision.status.progress.step == 7 and decision.status.progress.step_display == "7/10"
    assert decision.status.progress.eta_display is None  # the trainer gave no ETA yet
    assert decision.status.artifacts.manifest == "s3://data/x/manifest.json"  # launch's artifacts are kept


@pytest.mark.parametrize(("seconds", "shown"), [(0, "0s"), (44.6, "45s"), (725, "12m05s"), (11_220, "3h07m")])
def test_eta_is_shown_as_a_duration(seconds: float, shown: str) -> None:
    assert transitions.duration(seconds) == shown


def test_a_condition_keeps_its_transition_time_while_its_status_holds() -> None:
    running = decide("job", spec(), launched(), Observed(attempts={0: RUNNING}, running_pods=2), GENERATION).status
    before = transitions.condition(running, "Running").last_transition_time
    again = transitions.with_condition(running, "Running", "True", "AllPodsRunning", "2 pods", GENERATION)
    assert transitions.condition(again, "Running").last_transition_time == before


def test_max_restarts_names_the_last_error() -> None:
    observed = Observed(attempts={2: FAILED}, exits=(PodExit("job-a2-0", 137, "OOMKilled"),))
    failed = transitions.condition(decide("job", spec(), launched(2), observed, GENERATION).status, "Failed")
    assert failed.message == ("the gang failed 3 times (maxRestarts 2); last error: pod job-a2-0 exited with code "
                              "137 (OOMKilled): see its log")


def test_a_resume_restarts_the_deadline_clock() -> None:
    held = suspended().model_copy(update={"start_time": NOW - timedelta(hours=1)})
    decision = decide("job", spec(activeDeadlineSeconds=60), held,
                      Observed(attempts={0: Attempt(suspended=True)}, suspend_request=False), GENERATION)
    assert decision.status.phase == Phase.LAUNCHING and decision.status.start_time >= NOW
