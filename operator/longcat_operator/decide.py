"""Deciding: a pure function from (spec, status, what was observed) to the next status and the actions to take.

No API calls, no clock but the status transitions' timestamps: `tests/test_decide.py` drives it as data.

A gang is attempt N = `status.restarts` (its Job is `<job>-a<N>`). A restart works the way JobSet's does: the
pass that sees attempt N fail only raises `status.restarts` to N + 1; the next pass creates attempt N + 1 and then
deletes the attempts below it. A pass whose status is older than the attempts it finds (a slow watch) does nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from longcat_job.api import DatasetStatus, JobSpec, JobStatus, Phase
from longcat_job.failures import ExitCode, FailureReason
from longcat_job.progress import TrainerProgress

from . import status as transitions
from .gang import gang_name

# What a running gang's phase is, by what its trainer last reported in progress.json.
# A trainer that reports Succeeded is still Training for the job until its Job completes.
TRAINER_PHASES = {"Caching": Phase.CACHING, "Training": Phase.TRAINING, "Succeeded": Phase.TRAINING}
# Phases of a gang whose pods have run: when one stops, the Job completes or fails next, the phase stays.
STARTED = frozenset({Phase.CACHING, Phase.TRAINING})


# --- what was observed ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """A reason the job cannot run, found before launch: condition `condition` becomes False."""

    condition: str
    reason: str
    message: str
    datasets: list[DatasetStatus] | None = None


@dataclass(frozen=True)
class Preflight:
    """The datasets checked and manifest.json written (or the refusal that stopped it)."""

    datasets: list[DatasetStatus] = field(default_factory=list)
    manifest: str | None = None
    refusal: Refusal | None = None


@dataclass(frozen=True)
class Attempt:
    """One gang attempt's Job, by its conditions."""

    complete: bool = False
    failed: bool = False
    suspended: bool = False


@dataclass(frozen=True)
class PodExit:
    """A container of the current attempt that ended with a non-zero code, and what it left as its reason."""

    pod: str
    exit_code: int
    reason: str | None = None  # the kubelet's (Error, OOMKilled)
    message: str | None = None  # the trainer's termination message, without its reason
    failure: FailureReason | None = None  # the reason the trainer's termination message gave

    def describe(self, meaning: str = "see its log") -> str:
        """The trainer's termination message; when it left none (killed, out of memory), the code and `meaning`."""
        if self.message:
            return self.message
        why = f" ({self.reason})" if self.reason else ""
        return f"pod {self.pod} exited with code {self.exit_code}{why}: {meaning}"


@dataclass(frozen=True)
class Observed:
    """What reading found. `attempts` is None where the pass does not look at the gang (launch); a launched job's
    pass always looks."""

    refusal: Refusal | None = None  # the spec cannot run (invalid, local directories, several Secrets)
    preflight: Preflight | None = None
    attempts: Mapping[int, Attempt] | None = None
    running_pods: int = 0  # of the current attempt
    exits: tuple[PodExit, ...] = ()  # failed containers of the current attempt
    progress: TrainerProgress | None = None
    suspend_request: bool | None = None  # the spec.suspend change being handled (the field handler)
    now: datetime | None = None  # the clock of timed passes (ttlSecondsAfterFinished, activeDeadlineSeconds)


# --- what to do ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateAttempt:
    """Create (or adopt) the ConfigMap, the Service and attempt `number`'s Job."""

    number: int


@dataclass(frozen=True)
class DeleteAttempts:
    """Delete these attempts' Jobs (and, in the background, their pods)."""

    numbers: tuple[int, ...]


@dataclass(frozen=True)
class DeleteGang:
    """Delete these attempts' Jobs, the Service and the ConfigMap (a finished job's TTL)."""

    numbers: tuple[int, ...]


@dataclass(frozen=True)
class SetSuspended:
    number: int
    suspended: bool


@dataclass(frozen=True)
class Emit:
    """A Kubernetes event on the job."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class CountRestart:
    """The gang-restart metric."""


Action = CreateAttempt | DeleteAttempts | DeleteGang | SetSuspended | Emit | CountRestart


@dataclass(frozen=True)
class Decision:
    status: JobStatus
    actions: tuple[Action, ...] = ()
    # The launch pass stops here to run preflight (slow) with the Validating phase already shown.
    needs_preflight: bool = False


# --- deciding ------------------------------------------------------------------------------------------------


def decide(name: str, spec: JobSpec | None, status: JobStatus, observed: Observed,
           generation: int | None) -> Decision:
    """The next status and actions of job `name` (see the module docstring). `spec` is None only for a
    document that is not a valid job, which `observed.refusal` then says."""
    if status.phase in transitions.TERMINAL:
        return _finished(spec, status, observed, generation)
    if observed.refusal is not None:
        return _refused(status, observed.refusal, generation)
    assert spec is not None, "a job without a valid spec comes with a refusal"
    if not transitions.is_true(status, transitions.LAUNCHED):
        return _launch(name, spec, status, observed.preflight, generation)
    return _running_gang(name, spec, status, observed, generation)


def ttl_pending(ttl: int | None, status: JobStatus) -> bool:
    """A finished job with a gang that spec.ttlSecondsAfterFinished (`ttl`) is still to remove."""
    return (ttl is not None and status.phase in transitions.TERMINAL and transitions.is_true(status, transitions.LAUNCHED)
            and not transitions.is_true(status, transitions.GANG_DELETED))


def _finished(spec: JobSpec | None, status: JobStatus, observed: Observed, generation: int | None) -> Decision:
    ttl = spec.ttl_seconds_after_finished if spec is not None else None
    if ttl is None or not ttl_pending(ttl, status) or observed.now is None or status.completion_time is None:
        return Decision(status)
    if (observed.now - status.completion_time).total_seconds() < ttl:
        return Decision(status)
    numbers = tuple(sorted(observed.attempts or {}))
    return Decision(transitions.gang_deleted(status, ttl, generation),
                    (DeleteGang(numbers), Emit("Normal", "TTLExpired", f"gang deleted {ttl}s after the job finished")))


def _deadline_passed(spec: JobSpec, status: JobStatus, now: datetime | None) -> bool:
    deadline = spec.active_deadline_seconds
    return (deadline is not None and now is not None and status.start_time is not None
            and status.phase != Phase.SUSPENDED and (now - status.start_time).total_seconds() >= deadline)


def _refused(status: JobStatus, refusal: Refusal, generation: int | None) -> Decision:
    new = transitions.failed(status, refusal.condition, refusal.reason, refusal.message, generation, refusal.datasets)
    return Decision(new, (Emit("Warning", refusal.reason, refusal.message[:1000]),))


def _launch(name: str, spec: JobSpec, status: JobStatus, preflight: Preflight | None,
            generation: int | None) -> Decision:
    if preflight is None:
        return Decision(transitions.validating(status, generation), needs_preflight=True)
    if preflight.refusal is not None:
        return _refused(status, preflight.refusal, generation)
    resources = spec.resources
    new = transitions.launched(status, generation, datasets=preflight.datasets, manifest=preflight.manifest or "",
                               gang=gang_name(name, 0), nodes=resources.nodes, suspended=spec.suspend)
    message = (f"preflight passed ({transitions.sample_counts(preflight.datasets)}); gang of "
               f"{resources.nodes}x{resources.gpus_per_node} GPUs created")
    return Decision(new, (CreateAttempt(0), Emit("Normal", "Launched", message)))


def _running_gang(name: str, spec: JobSpec, status: JobStatus, observed: Observed, generation: int | None) -> Decision:
    attempts = observed.attempts or {}
    current = status.restarts
    if any(number > current for number in attempts):
        return Decision(status)  # this status predates a restart that already happened: the next pass sees it
    if observed.suspend_request is not None:
        return _suspend(status, attempts.get(current), observed.suspend_request, generation)
    if _deadline_passed(spec, status, observed.now):
        # Deleting the Jobs sends SIGTERM: the trainer saves a checkpoint within the grace period.
        message = (f"the gang ran longer than spec.activeDeadlineSeconds={spec.active_deadline_seconds}; its pods "
                   "were stopped (the trainer saves a checkpoint on SIGTERM)")
        new = transitions.stopped(status, "DeadlineExceeded", message, generation)
        return _with_phase_event(status, new, [DeleteAttempts(tuple(sorted(attempts))),
                                               Emit("Warning", "DeadlineExceeded", message)])
    older = tuple(sorted(number for number in attempts if number < current))
    cleanup: tuple[Action, ...] = (DeleteAttempts(older),) if older else ()  # the second half of a restart
    base = status if observed.progress is None else transitions.mirrored(status, observed.progress)
    attempt = attempts.get(current)
    if attempt is None:
        missing = () if older else (Emit("Normal", "GangRecreated", f"Job {gang_name(name, current)} was missing"),)
        return Decision(base, (CreateAttempt(current), *cleanup, *missing))
    decision = _current_attempt(spec, status, base, attempt, observed, generation)
    return Decision(decision.status, (*decision.actions, *cleanup))


def _current_attempt(spec: JobSpec, status: JobStatus, base: JobStatus, attempt: Attempt, observed: Observed,
                     generation: int | None) -> Decision:
    """`base` is `status` with progress.json mirrored into it."""
    if attempt.complete:
        lora = (base.artifacts.lora if base.artifacts else None) or "(see output)"
        return _with_phase_event(status, transitions.succeeded(base, generation),
                                 [Emit("Normal", "Succeeded", f"LoRA at {lora}")])
    if attempt.failed:
        return _failed_gang(spec, status, base, observed, generation)
    if attempt.suspended:
        return _with_phase_event(status, transitions.suspending(base, generation), [])
    if observed.running_pods == spec.resources.nodes:
        reported = TRAINER_PHASES.get(observed.progress.phase) if observed.progress is not None else None
        phase = reported or (status.phase if status.phase in STARTED else Phase.CACHING)
        new = transitions.running(base, observed.running_pods, phase, generation)
    elif status.phase in STARTED:
        new = base  # pods ending: the Job's Complete or Failed condition follows
    else:
        new = transitions.with_phase(base, Phase.LAUNCHING)
    return _with_phase_event(status, new, [])


def _failed_gang(spec: JobSpec, old: JobStatus, base: JobStatus, observed: Observed,
                 generation: int | None) -> Decision:
    stop = final_failure(old.restarts, spec.max_restarts, observed)
    if stop is not None:
        reason, message = stop
        return _with_phase_event(old, transitions.stopped(base, reason, message, generation),
                                 [Emit("Warning", reason, message[:1000])])
    attempt = old.restarts
    new = transitions.restarting(base, spec.max_restarts, generation)
    events = [Emit("Warning", "GangRestarted",
                   f"a pod of attempt {attempt} failed; starting attempt {attempt + 1} of {spec.max_restarts}"),
              CountRestart()]
    return _with_phase_event(old, new, events)


def final_failure(attempt: int, max_restarts: int, observed: Observed) -> tuple[str, str] | None:
    """(reason, message) when a failed gang must not be restarted; None when a restart may help."""
    # torchrun exits 1 whatever its workers did, so the trainer's own report is the first witness.
    failure = observed.progress.failure if observed.progress is not None else None
    if failure is not None and failure.reason.permanent:
        return failure.reason.value, failure.message
    # When progress.json could not be written (the output bucket refused), the termination message says why.
    reported = next((e for e in observed.exits if e.failure is not None and e.failure.permanent), None)
    if reported is not None and reported.failure is not None:
        return reported.failure.value, reported.describe()
    config_exit = next((e for e in observed.exits if e.exit_code == ExitCode.CONFIG), None)
    if config_exit is not None:
        return FailureReason.BAD_INPUT.value, config_exit.describe("the job's configuration or data is wrong (see its log)")
    if attempt >= max_restarts:
        # progress.json when rank 0 could write it; the pods' termination messages when it could not (S3 down).
        cause = failure.message if failure is not None else (observed.exits[0].describe() if observed.exits else None)
        return "MaxRestartsExceeded", f"the gang failed {attempt + 1} times (maxRestarts {max_restarts})" + (
            f"; last error: {cause}" if cause else ""
        )
    return None


def _suspend(status: JobStatus, attempt: Attempt | None, suspended: bool, generation: int | None) -> Decision:
    # A restarted operator replays the field as changed when its diff-base was never stored: not a transition.
    if attempt is None or attempt.suspended == suspended:
        return Decision(status)
    new = transitions.suspending(status, generation) if suspended else transitions.resuming(status, generation)
    event = Emit("Normal", "Suspended", "gang suspended") if suspended else Emit("Normal", "Resumed", "gang resumed")
    return Decision(new, (SetSuspended(status.restarts, suspended), event))


def _with_phase_event(old: JobStatus, new: JobStatus, actions: list[Action]) -> Decision:
    """`actions`, and an event when the phase changes."""
    if new.phase != old.phase:
        before = old.phase.value if old.phase else None
        actions = [*actions, Emit("Normal", new.phase.value, f"phase {before} -> {new.phase.value}")]
    return Decision(new, tuple(actions))
