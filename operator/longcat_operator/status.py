"""Every transition of a job's status: functions from the status (`JobStatus`) to the next one.

`decide.py` composes these; nothing else builds a status. Conditions have the metav1.Condition shape and keep
their `lastTransitionTime` unless their status changes.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from longcat_job.api import Artifacts, Condition, DatasetStatus, JobStatus, Phase
from longcat_job.progress import TrainerProgress

TERMINAL = frozenset({Phase.SUCCEEDED, Phase.FAILED})

# Condition types, in the order a job meets them.
VALIDATED = "Validated"
DATASET_READY = "DatasetReady"
LAUNCHED = "Launched"
RUNNING = "Running"
COMPLETE = "Complete"
FAILED = "Failed"
SUSPENDED = "Suspended"  # as a Job's: True while spec.suspend holds the gang's pods away
GANG_DELETED = "GangDeleted"  # spec.ttlSecondsAfterFinished removed the finished gang's objects

# Longest message kept in a condition; preflight reports can list many problems.
MAX_MESSAGE = 4000

ConditionStatus = Literal["True", "False", "Unknown"]


def now() -> datetime:
    # Kubernetes' own timestamps have whole seconds.
    return datetime.now(UTC).replace(microsecond=0)


def parse(document: dict | None) -> JobStatus:
    """The status of a job as the API server returns it (camelCase, timestamps as text)."""
    return JobStatus.model_validate(document or {}, strict=False)


def dump(status: JobStatus) -> dict:
    return status.model_dump(by_alias=True, exclude_none=True, mode="json")


def condition(status: JobStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def is_true(status: JobStatus, type_: str) -> bool:
    found = condition(status, type_)
    return found is not None and found.status == "True"


def is_launched(status: JobStatus) -> bool:
    return is_true(status, LAUNCHED) and status.phase not in TERMINAL


def with_condition(
    status: JobStatus, type_: str, state: ConditionStatus, reason: str, message: str, generation: int | None
) -> JobStatus:
    """The status with condition `type_` set; the other conditions are kept as they are."""
    old = condition(status, type_)
    new = Condition(
        type=type_, status=state, reason=reason, message=message[:MAX_MESSAGE], observed_generation=generation,
        last_transition_time=old.last_transition_time if old is not None and old.status == state else now(),
    )
    conditions = [new if c.type == type_ else c for c in status.conditions]
    if old is None:
        conditions.append(new)
    return status.model_copy(update={"conditions": conditions})


def with_phase(status: JobStatus, phase: Phase) -> JobStatus:
    return status.model_copy(update={"phase": phase})


# --- launch ------------------------------------------------------------------------------------------------------


def validating(status: JobStatus, generation: int | None) -> JobStatus:
    """The spec is valid; preflight runs next (it may take a while on large datasets)."""
    status = with_condition(status, VALIDATED, "True", "Valid", "the spec is valid", generation)
    return status.model_copy(update={"phase": Phase.VALIDATING, "observed_generation": generation})


def failed(
    status: JobStatus, type_: str, reason: str, message: str, generation: int | None,
    datasets: list[DatasetStatus] | None = None,
) -> JobStatus:
    """The job ends: condition `type_` False (and Failed True) with the reason; phase Failed."""
    status = with_condition(status, type_, "False", reason, message, generation)
    status = with_condition(status, FAILED, "True", reason, message, generation)
    update: dict = {"phase": Phase.FAILED, "completion_time": now()}
    if datasets is not None:
        update["datasets"] = datasets
    return status.model_copy(update=update)


def sample_counts(datasets: list[DatasetStatus]) -> str:
    return ", ".join(f"{d.id}: {d.samples} samples" for d in datasets)


def launched(
    status: JobStatus, generation: int | None, *, datasets: list[DatasetStatus], manifest: str, gang: str,
    nodes: int, suspended: bool,
) -> JobStatus:
    status = with_condition(status, DATASET_READY, "True", "PreflightPassed", sample_counts(datasets), generation)
    status = with_condition(status, LAUNCHED, "True", "GangCreated", f"Job {gang} with {nodes} pods", generation)
    status = status.model_copy(update={
        "phase": Phase.LAUNCHING, "observed_generation": generation,
        "restarts": 0, "start_time": now(), "artifacts": Artifacts(manifest=manifest), "datasets": datasets,
    })
    return suspending(status, generation) if suspended else status


# --- a running gang ----------------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """45s, 12m05s, 3h07m: what kubectl shows as the ETA."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def mirrored(status: JobStatus, progress: TrainerProgress) -> JobStatus:
    """progress.json's step, loss, rate, ETA and artifacts in the status (`step` as step/max for kubectl)."""
    eta = progress.progress.eta_seconds
    shown = progress.progress.model_copy(update={
        "step_display": f"{progress.progress.step}/{progress.progress.max_steps}",
        "eta_display": duration(eta) if eta is not None else None,
    })
    reported = progress.artifacts.model_dump(exclude_none=True)
    artifacts = (status.artifacts or Artifacts()).model_copy(update=reported)
    return status.model_copy(update={"progress": shown, "artifacts": artifacts})


def succeeded(status: JobStatus, generation: int | None) -> JobStatus:
    status = with_condition(status, RUNNING, "False", "Finished", "all pods succeeded", generation)
    status = with_condition(status, COMPLETE, "True", "Succeeded",
                            "training finished; artifacts are in the output location", generation)
    return status.model_copy(update={"phase": Phase.SUCCEEDED, "completion_time": now()})


def stopped(status: JobStatus, reason: str, message: str, generation: int | None) -> JobStatus:
    """A failed gang that no restart can help: Running False and Failed True with the reason."""
    status = with_condition(status, RUNNING, "False", reason, message, generation)
    status = with_condition(status, FAILED, "True", reason, message, generation)
    return status.model_copy(update={"phase": Phase.FAILED, "completion_time": now()})


def gang_deleted(status: JobStatus, ttl_s: int, generation: int | None) -> JobStatus:
    return with_condition(status, GANG_DELETED, "True", "TTLExpired",
                          f"the gang's Jobs, Service and ConfigMap were deleted {ttl_s}s after the job finished "
                          "(spec.ttlSecondsAfterFinished); its artifacts stay in the output location", generation)


def suspending(status: JobStatus, generation: int | None) -> JobStatus:
    status = with_condition(status, SUSPENDED, "True", "JobSuspended", "spec.suspend is true: the gang's pods are "
                            "stopped, its checkpoints stay", generation)
    if condition(status, RUNNING) is not None:
        status = with_condition(status, RUNNING, "False", "Suspended", "the gang is suspended", generation)
    return with_phase(status, Phase.SUSPENDED)


def resuming(status: JobStatus, generation: int | None) -> JobStatus:
    """Resuming restarts the active-deadline clock (start_time), as a Job's resume does."""
    status = with_condition(status, SUSPENDED, "False", "JobResumed", "the gang resumes from its last checkpoint",
                            generation)
    return status.model_copy(update={"phase": Phase.LAUNCHING, "start_time": now()})


def restarting(status: JobStatus, max_restarts: int, generation: int | None) -> JobStatus:
    """The gang failed and restarts: attempt `restarts + 1` is the current one from now on (created next pass)."""
    attempt = status.restarts + 1
    status = with_condition(status, RUNNING, "False", "GangRestarted",
                            f"a pod failed; restart {attempt} of {max_restarts}, resuming from the last checkpoint",
                            generation)
    return status.model_copy(update={"restarts": attempt, "phase": Phase.LAUNCHING})


def running(status: JobStatus, pods: int, phase: Phase, generation: int | None) -> JobStatus:
    """Every pod of the gang runs; `phase` is what the trainer reports (Caching until it says otherwise)."""
    status = with_condition(status, RUNNING, "True", "AllPodsRunning", f"{pods} pods running", generation)
    return with_phase(status, phase)
