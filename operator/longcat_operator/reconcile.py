"""The kopf handlers: each one is a step of DESIGN.md's data flow and delegates to plain functions.

launch   (create, resume)  validate -> preflight -> manifest.json -> ConfigMap, Service, Indexed Job
observe  (timer)           mirror the gang and progress.json into status; restart the gang on failure
suspend  (spec.suspend)    suspend or resume the gang
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from datetime import UTC, datetime
from typing import Any

import kopf
from botocore.exceptions import BotoCoreError, ClientError

from . import kube, manifests, status
from .api import GROUP, PLURAL, VERSION, Artifacts, LongCatI2VJob, Phase
from .manifest import build_manifest, write_manifest
from .metrics import GANG_RESTARTS, JOBS_BY_PHASE, PREFLIGHT_FAILURES, PREFLIGHT_SECONDS, QUEUE_LATENCY, RECONCILE_SECONDS
from .preflight import run_preflight
from .progress import EXIT_CONFIG_ERROR, PROGRESS_KEY, TrainerProgress
from .s3 import S3AccessError, S3Credentials
from .settings import OperatorSettings
from .storage import store_for
from .validation import InvalidJob, parse_job

RESOURCE = (GROUP, VERSION, PLURAL)
SETTINGS = OperatorSettings.from_env()
# A Secret created right after the job gets this many tries, `SECRET_RETRY_DELAY_S` apart, before the job fails.
SECRET_RETRIES = 3
SECRET_RETRY_DELAY_S = 10
# What a running gang's phase is, by what its trainer last reported in progress.json.
TRAINER_PHASES = {"Caching": Phase.CACHING, "Training": Phase.TRAINING}
# Trainer failures that a restart cannot fix: the job fails at once.
NO_RESTART = {"BadInput", "InvalidConfig"}


class JobFailed(Exception):
    """Ends the job: `condition` becomes False with `reason` and the message, phase becomes Failed."""

    def __init__(self, condition: str, reason: str, message: str, status_fields: dict[str, Any] | None = None):
        super().__init__(message)
        self.condition = condition
        self.reason = reason
        self.status_fields = status_fields or {}


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's ServiceAccount in a cluster, else KUBECONFIG as it is when the operator starts."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Handler progress lives in annotations: the CRD's structural status schema would prune status.kopf.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 32
    settings.peering.lifetime = SETTINGS.peering_lifetime_s
    if SETTINGS.webhook_port:
        certs = Path(SETTINGS.webhook_cert_dir)
        settings.admission.server = kopf.WebhookServer(
            addr="0.0.0.0", port=SETTINGS.webhook_port, certfile=certs / "tls.crt", pkeyfile=certs / "tls.key"
        )


# --- launch -----------------------------------------------------------------------------------------------------


def _job_of(body: kopf.Body) -> LongCatI2VJob:
    document = {key: body[key] for key in ("apiVersion", "kind", "spec")}
    document["metadata"] = {"name": body.metadata.name, "namespace": body.metadata.namespace}
    return parse_job(document)


def _owner(body: kopf.Body) -> dict[str, Any]:
    return {"apiVersion": body["apiVersion"], "kind": body["kind"],
            "metadata": {"name": body.metadata.name, "uid": body.metadata.uid}}


def _credentials(job: LongCatI2VJob, retry: int) -> S3Credentials | None:
    secret = manifests.credentials_secret(job)
    if secret is None:
        return None
    try:
        return kube.read_credentials(job.metadata.namespace, secret)
    except LookupError as exc:
        if retry < SECRET_RETRIES:
            raise kopf.TemporaryError(f"{exc} (retrying)", delay=SECRET_RETRY_DELAY_S) from None
        raise JobFailed(status.DATASET_READY, "CredentialsMissing", str(exc)) from None
    except S3AccessError as exc:
        raise JobFailed(status.DATASET_READY, "CredentialsInvalid", str(exc)) from None


def _validate(body: kopf.Body) -> LongCatI2VJob:
    try:
        job = _job_of(body)
    except InvalidJob as exc:
        raise JobFailed(status.VALIDATED, "InvalidSpec", str(exc)) from None
    local = manifests.local_locations(job)
    if local:
        raise JobFailed(
            status.VALIDATED, "LocalLocation",
            f"{', '.join(local)}: local directories are for `longcat-i2v run` on one machine; in a cluster, "
            "put datasets and output in S3 (source.s3 / output.s3)",
        )
    try:
        manifests.credentials_secret(job)
    except manifests.ManifestError as exc:
        raise JobFailed(status.VALIDATED, "InvalidSpec", str(exc)) from None
    return job


def _preflight(job: LongCatI2VJob, credentials: S3Credentials | None) -> tuple[dict[str, Any], str]:
    """Lists and pairs every dataset, writes manifest.json; returns the datasets' status and the manifest URI."""
    lookup = lambda name: credentials if name else None  # noqa: E731  (one Secret per job, see manifests)
    with PREFLIGHT_SECONDS.time():
        result = run_preflight(job.spec, credentials=lookup)
    datasets = [d.to_status().model_dump(by_alias=True, exclude_none=True) for d in result.report.datasets]
    if not result.report.ok:
        reasons = {p.kind.value for d in result.report.datasets for p in d.problems if p.severity == "error"}
        reasons |= {"access" for d in result.report.datasets if d.access_error}
        for reason in reasons or {"unknown"}:
            PREFLIGHT_FAILURES.labels(reason=reason).inc()
        raise JobFailed(status.DATASET_READY, "PreflightFailed", "\n".join(result.report.lines()),
                        {"datasets": datasets})
    output = store_for(job.spec.output, what="output (spec.output)", credentials=lookup)
    try:
        uri = write_manifest(output, build_manifest(job.metadata.name, job.spec, result))
    except S3AccessError as exc:
        PREFLIGHT_FAILURES.labels(reason="output").inc()
        raise JobFailed(status.DATASET_READY, "OutputUnwritable", str(exc)) from None
    return {"datasets": datasets}, uri


def _ensure_gang(job: LongCatI2VJob, owner: dict[str, Any], attempt: int) -> bool:
    """Creates (or adopts) the ConfigMap, Service and this attempt's Job; True when the Job is new."""
    kube.create_or_adopt(manifests.config_map(job, SETTINGS, owner))
    kube.create_or_adopt(manifests.service(job, SETTINGS, owner))
    return kube.create_or_adopt(manifests.indexed_job(job, SETTINGS, owner, attempt))


def _fail(body: kopf.Body, patch: kopf.Patch, exc: JobFailed) -> None:
    conditions = status.with_condition(body.status.get("conditions"), exc.condition, "False", exc.reason, str(exc),
                                       body.metadata.get("generation"))
    conditions = status.with_condition(conditions, status.FAILED, "True", exc.reason, str(exc),
                                       body.metadata.get("generation"))
    patch.status.update(phase=Phase.FAILED.value, conditions=conditions, completionTime=status.now(),
                        **exc.status_fields)
    kopf.warn(body, reason=exc.reason, message=str(exc)[:1000])


def _timed(handler: str):
    def wrap(fn):
        # wraps() keeps the name kopf derives the handler's id (and its annotation key) from.
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with RECONCILE_SECONDS.labels(handler=handler).time():
                return fn(*args, **kwargs)

        return timed

    return wrap


@kopf.on.resume(*RESOURCE)
@kopf.on.create(*RESOURCE)
@_timed("launch")
def launch(body: kopf.Body, patch: kopf.Patch, retry: int, logger: logging.Logger, **_: Any) -> None:
    current = body.status
    if current.get("phase") in status.TERMINAL:
        return
    namespace, name = body.metadata.namespace, body.metadata.name
    generation = body.metadata.get("generation")
    launched = status.condition(current.get("conditions"), status.LAUNCHED)
    try:
        job = _validate(body)
        if launched and launched["status"] == "True":
            # A resumed operator: the gang exists or is re-created; the data was checked already.
            _ensure_gang(job, _owner(body), current.get("restarts", 0))
            return
        conditions = status.with_condition(current.get("conditions"), status.VALIDATED, "True", "Valid",
                                           "the spec is valid", generation)
        kube.patch_status(namespace, name, {"phase": Phase.VALIDATING.value, "conditions": conditions,
                                            "observedGeneration": generation})
        credentials = _credentials(job, retry)
        dataset_status, manifest_uri = _preflight(job, credentials)
    except JobFailed as exc:
        _fail(body, patch, exc)
        return
    counts = ", ".join(f"{d['id']}: {d.get('samples', 0)} samples" for d in dataset_status["datasets"])
    conditions = status.with_condition(conditions, status.DATASET_READY, "True", "PreflightPassed", counts, generation)
    if _ensure_gang(job, _owner(body), 0):
        created = datetime.fromisoformat(body.metadata["creationTimestamp"].replace("Z", "+00:00"))
        QUEUE_LATENCY.observe(max(0.0, (datetime.now(UTC) - created).total_seconds()))
    conditions = status.with_condition(conditions, status.LAUNCHED, "True", "GangCreated",
                                       f"Job {manifests.gang_name(name, 0)} with {job.spec.resources.nodes} pods",
                                       generation)
    phase = Phase.SUSPENDED if job.spec.suspend else Phase.LAUNCHING
    patch.status.update(phase=phase.value, conditions=conditions, observedGeneration=generation, restarts=0,
                        startTime=status.now(), artifacts={"manifest": manifest_uri}, **dataset_status)
    kopf.info(body, reason="Launched", message=f"preflight passed ({counts}); gang of "
              f"{job.spec.resources.nodes}x{job.spec.resources.gpus_per_node} GPUs created")
    logger.info("launched %s/%s", namespace, name)


def admit(body: kopf.Body, **_: Any) -> None:
    """The optional webhook: refuses at `kubectl apply` what the operator would fail at launch and CEL cannot
    say (local directories in a cluster, several credentials Secrets), with the same message."""
    try:
        _validate(body)
    except JobFailed as exc:
        raise kopf.AdmissionError(str(exc), code=422) from None


# kopf refuses to start with an admission handler but no server, so the handler exists only with the webhook.
if SETTINGS.webhook_port:
    kopf.on.validate(*RESOURCE, id="validate-job")(admit)


# --- observe ----------------------------------------------------------------------------------------------------


def _is_launched(status_: kopf.Status, **_: Any) -> bool:
    launched = status.condition(status_.get("conditions"), status.LAUNCHED)
    return bool(launched and launched["status"] == "True") and status_.get("phase") not in status.TERMINAL


def _job_condition(k8s_job: Any, type_: str) -> bool:
    return any(c.type == type_ and c.status == "True" for c in (k8s_job.status.conditions or []))


def _termination_message(
    namespace: str, name: str, attempt: int, exit_code: int | None = None, *, meaning: str = "see its log"
) -> str | None:
    """The trainer's termination message from a pod of the attempt that exited with `exit_code` (any failure
    when None); when the pod left none (killed, out of memory), its code and `meaning`. None without such a pod."""
    selector = f"{manifests.LABEL_JOB}={name},{manifests.LABEL_ATTEMPT}={attempt}"
    for pod in kube.pods_of(namespace, selector):
        for container in pod.status.container_statuses or []:
            terminated = container.state and container.state.terminated
            if terminated and terminated.exit_code and exit_code in (None, terminated.exit_code):
                if terminated.message:
                    return terminated.message
                why = f" ({terminated.reason})" if terminated.reason else ""
                return f"pod {pod.metadata.name} exited with code {terminated.exit_code}{why}: {meaning}"
    return None


def _final_failure(
    namespace: str, name: str, attempt: int, progress: TrainerProgress | None, max_restarts: int
) -> tuple[str, str] | None:
    """(reason, message) when a failed gang must not be restarted; None when a restart may help."""
    # torchrun exits 1 whatever its workers did, so the trainer's own report is the first witness.
    failure = progress.failure if progress is not None else None
    if failure is not None and failure.reason in NO_RESTART:
        return failure.reason, failure.message
    message = _termination_message(namespace, name, attempt, EXIT_CONFIG_ERROR,
                                   meaning="the job's configuration or data is wrong (see its log)")
    if message is not None:
        return "BadInput", message
    if attempt >= max_restarts:
        # progress.json when rank 0 could write it; the pods' termination messages when it could not (S3 down).
        cause = failure.message if failure is not None else _termination_message(namespace, name, attempt)
        return "MaxRestartsExceeded", f"the gang failed {attempt + 1} times (maxRestarts {max_restarts})" + (
            f"; last error: {cause}" if cause else ""
        )
    return None


def _read_progress(job: LongCatI2VJob, credentials: S3Credentials | None) -> TrainerProgress | None:
    output = store_for(job.spec.output, what="output (spec.output)", credentials=lambda n: credentials if n else None)
    try:
        return TrainerProgress.from_json(output.get_bytes(PROGRESS_KEY))
    except (S3AccessError, FileNotFoundError, ClientError, BotoCoreError, ValueError):
        # Not written yet, or the store is briefly unavailable: the next tick tries again.
        return None


def _mirror(progress: TrainerProgress, into: dict[str, Any]) -> None:
    shown = progress.progress.model_copy(update={"step_display": f"{progress.progress.step}/{progress.progress.max_steps}"})
    into["progress"] = shown.model_dump(by_alias=True, exclude_none=True, mode="json")
    artifacts = {**into.get("artifacts", {}), **progress.artifacts.model_dump(by_alias=True, exclude_none=True)}
    into["artifacts"] = Artifacts.model_validate(artifacts).model_dump(by_alias=True, exclude_none=True)


def _restarted_since(namespace: str, name: str, attempt: int) -> bool:
    return kube.read_job(namespace, manifests.gang_name(name, attempt + 1)) is not None


@kopf.timer(*RESOURCE, interval=SETTINGS.progress_interval_s, when=lambda status, **kw: _is_launched(status))
@_timed("observe")
def observe(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    namespace, name = body.metadata.namespace, body.metadata.name
    current = body.status
    generation = body.metadata.get("generation")
    attempt = current.get("restarts", 0)
    conditions = current.get("conditions")
    k8s_job = kube.read_job(namespace, manifests.gang_name(name, attempt))
    if (k8s_job is None or _job_condition(k8s_job, "Failed")) and _restarted_since(namespace, name, attempt):
        # The timer's body predates the status patch of our own restart (a slow watch): acting on it would
        # recreate the replaced attempt or restart twice. The next tick sees the new attempt.
        return
    job = _job_of(body)
    credentials = _credentials(job, retry=SECRET_RETRIES)
    update: dict[str, Any] = {"artifacts": dict(current.get("artifacts") or {})}
    progress = _read_progress(job, credentials)
    if progress is not None:
        _mirror(progress, update)

    if k8s_job is None:
        _ensure_gang(job, _owner(body), attempt)
        kopf.info(body, reason="GangRecreated", message=f"Job {manifests.gang_name(name, attempt)} was missing")
    elif _job_condition(k8s_job, "Complete"):
        conditions = status.with_condition(conditions, status.RUNNING, "False", "Finished", "all pods succeeded",
                                           generation)
        conditions = status.with_condition(conditions, status.COMPLETE, "True", "Succeeded",
                                           "training finished; artifacts are in the output location", generation)
        update.update(phase=Phase.SUCCEEDED.value, completionTime=status.now())
        kopf.info(body, reason="Succeeded", message=f"LoRA at {update['artifacts'].get('lora', '(see output)')}")
    elif _job_condition(k8s_job, "Failed"):
        stop = _final_failure(namespace, name, attempt, progress, job.spec.max_restarts)
        if stop is not None:
            reason, message = stop
            conditions = status.with_condition(conditions, status.RUNNING, "False", reason, message, generation)
            conditions = status.with_condition(conditions, status.FAILED, "True", reason, message, generation)
            update.update(phase=Phase.FAILED.value, completionTime=status.now())
            kopf.warn(body, reason=reason, message=message[:1000])
        else:
            kube.delete_job(namespace, manifests.gang_name(name, attempt))
            _ensure_gang(job, _owner(body), attempt + 1)
            GANG_RESTARTS.labels(namespace=namespace, job=name).inc()
            conditions = status.with_condition(conditions, status.RUNNING, "False", "GangRestarted",
                                               f"a pod failed; restart {attempt + 1} of {job.spec.max_restarts}, "
                                               "resuming from the last checkpoint", generation)
            update.update(restarts=attempt + 1, phase=Phase.LAUNCHING.value)
            kopf.warn(body, reason="GangRestarted", message=f"a pod of attempt {attempt} failed; "
                      f"started attempt {attempt + 1} of {job.spec.max_restarts}")
    elif k8s_job.spec.suspend:
        update["phase"] = Phase.SUSPENDED.value
    else:
        pods = kube.pods_of(namespace, f"{manifests.LABEL_JOB}={name},{manifests.LABEL_ATTEMPT}={attempt}")
        running = sum(1 for p in pods if p.status.phase == "Running")
        if running == job.spec.resources.nodes:
            conditions = status.with_condition(conditions, status.RUNNING, "True", "AllPodsRunning",
                                               f"{running} pods running", generation)
            reported = TRAINER_PHASES.get(progress.phase) if progress is not None else None
            update["phase"] = (reported or Phase.CACHING).value
        else:
            update["phase"] = Phase.LAUNCHING.value
    update["conditions"] = conditions
    if update.get("phase") != current.get("phase"):
        kopf.info(body, reason=update["phase"], message=f"phase {current.get('phase')} -> {update['phase']}")
    patch.status.update(update)


# --- suspend and bookkeeping ------------------------------------------------------------------------------------


@kopf.on.field(*RESOURCE, field="spec.suspend")
@_timed("suspend")
def suspend(body: kopf.Body, new: bool | None, patch: kopf.Patch, **_: Any) -> None:
    current = body.status
    if current.get("phase") in status.TERMINAL or not _is_launched(current):
        return
    namespace, name = body.metadata.namespace, body.metadata.name
    gang = manifests.gang_name(name, current.get("restarts", 0))
    k8s_job = kube.read_job(namespace, gang)
    # A restarted operator replays the field as changed when its diff-base was never stored: not a transition.
    if k8s_job is None or bool(k8s_job.spec.suspend) == bool(new):
        return
    kube.set_job_suspended(namespace, gang, bool(new))
    patch.status["phase"] = (Phase.SUSPENDED if new else Phase.LAUNCHING).value
    kopf.info(body, reason="Suspended" if new else "Resumed", message="gang suspended" if new else "gang resumed")


@kopf.on.event(*RESOURCE)
def track_phase(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    if event["type"] == "DELETED":
        JOBS_BY_PHASE.forget(body.metadata.namespace, body.metadata.name)
    else:
        JOBS_BY_PHASE.observe(body.metadata.namespace, body.metadata.name, body.status.get("phase"))
