"""Reading: what `decide` needs to know about a job, from the API server and the job's S3 locations.

Nothing here changes anything in the cluster; failures that decide the job's fate (an invalid spec, a missing
Secret, bad data) come back as a `Refusal`, not as exceptions. Preflight writes manifest.json: freezing the
samples is part of checking them (DESIGN.md's preflight step).
"""

from __future__ import annotations

from typing import Any

import kopf
from botocore.exceptions import BotoCoreError, ClientError

from longcat_job.api import LongCatI2VJob
from longcat_job.parse import InvalidJob, parse_job
from longcat_job.preflight import run_preflight
from longcat_job.progress import PROGRESS_KEY, TrainerProgress
from longcat_job.s3 import S3AccessError, S3Credentials
from longcat_job.sample_manifest import build_manifest, write_manifest
from longcat_job.storage import store_for

from . import gang, kube
from .decide import Attempt, Observed, PodExit, Preflight, Refusal
from .metrics import PREFLIGHT_FAILURES, PREFLIGHT_SECONDS
from .settings import OperatorSettings
from .status import DATASET_READY, VALIDATED

# A Secret created right after the job gets this many tries, `SECRET_RETRY_DELAY_S` apart, before the job fails.
SECRET_RETRIES = 3
SECRET_RETRY_DELAY_S = 10


def job_of(body: kopf.Body, settings: OperatorSettings) -> LongCatI2VJob:
    """The job of a watched object as the operator and its pods use it: S3 locations without an endpoint get the
    operator's default (raises InvalidJob)."""
    document = {key: body[key] for key in ("apiVersion", "kind", "spec")}
    document["metadata"] = {"name": body.metadata.name, "namespace": body.metadata.namespace}
    return gang.resolved(parse_job(document), settings)


def validated(body: kopf.Body, settings: OperatorSettings) -> tuple[LongCatI2VJob | None, Refusal | None]:
    """The job, or why it cannot run in a cluster at all (what the optional webhook refuses at admission)."""
    try:
        job = job_of(body, settings)
    except InvalidJob as exc:
        return None, Refusal(VALIDATED, "InvalidSpec", str(exc))
    local = gang.local_locations(job)
    if local:
        return job, Refusal(
            VALIDATED, "LocalLocation",
            f"{', '.join(local)}: local directories are for `longcat-i2v run` on one machine; in a cluster, "
            "put datasets and output in S3 (source.s3 / output.s3)",
        )
    try:
        gang.credentials_secret(job)
    except gang.GangError as exc:
        return job, Refusal(VALIDATED, "InvalidSpec", str(exc))
    return job, None


def credentials(job: LongCatI2VJob, retry: int) -> tuple[S3Credentials | None, Refusal | None]:
    """The credentials of the job's Secret (None: the pod's own identity). A missing Secret is retried a few
    times (kopf.TemporaryError) before it refuses the job: it is often created just after the job."""
    secret = gang.credentials_secret(job)
    if secret is None:
        return None, None
    try:
        return kube.read_credentials(job.metadata.namespace, secret), None
    except LookupError as exc:
        if retry < SECRET_RETRIES:
            raise kopf.TemporaryError(f"{exc} (retrying)", delay=SECRET_RETRY_DELAY_S) from None
        return None, Refusal(DATASET_READY, "CredentialsMissing", str(exc))
    except S3AccessError as exc:
        return None, Refusal(DATASET_READY, "CredentialsInvalid", str(exc))


def _lookup(credentials: S3Credentials | None):
    return lambda secret_name: credentials if secret_name else None  # one Secret per job (gang.py)


def preflight(job: LongCatI2VJob, credentials: S3Credentials | None) -> Preflight:
    """Lists and pairs every dataset and writes manifest.json under the output location."""
    with PREFLIGHT_SECONDS.time():
        result = run_preflight(job.spec, credentials=_lookup(credentials))
    datasets = [d.to_status() for d in result.report.datasets]
    if not result.report.ok:
        reasons = {p.kind.value for d in result.report.datasets for p in d.problems if p.severity == "error"}
        reasons |= {"access" for d in result.report.datasets if d.access_error}
        for reason in reasons or {"unknown"}:
            PREFLIGHT_FAILURES.labels(reason=reason).inc()
        refusal = Refusal(DATASET_READY, "PreflightFailed", "\n".join(result.report.lines()), datasets)
        return Preflight(datasets, refusal=refusal)
    output = store_for(job.spec.output, what="output (spec.output)", credentials=_lookup(credentials))
    try:
        manifest = write_manifest(output, build_manifest(job.metadata.name, job.spec, result))
    except S3AccessError as exc:
        PREFLIGHT_FAILURES.labels(reason="output").inc()
        return Preflight(datasets, refusal=Refusal(DATASET_READY, "OutputUnwritable", str(exc)))
    return Preflight(datasets, manifest=manifest)


def progress(job: LongCatI2VJob, credentials: S3Credentials | None) -> TrainerProgress | None:
    output = store_for(job.spec.output, what="output (spec.output)", credentials=_lookup(credentials))
    try:
        return TrainerProgress.from_json(output.get_bytes(PROGRESS_KEY))
    except (S3AccessError, FileNotFoundError, ClientError, BotoCoreError, ValueError):
        # Not written yet, or the store is briefly unavailable: the next pass tries again.
        return None


def _is(k8s_job: Any, condition: str) -> bool:
    return any(c.type == condition and c.status == "True" for c in (k8s_job.status.conditions or []))


def attempts(namespace: str, name: str) -> dict[int, Attempt]:
    """Every attempt's Job of the job, by attempt number."""
    found = {}
    for k8s_job in kube.jobs_of(namespace, f"{gang.LABEL_JOB}={name}"):
        number = (k8s_job.metadata.labels or {}).get(gang.LABEL_ATTEMPT, "")
        if number.isdigit():
            found[int(number)] = Attempt(complete=_is(k8s_job, "Complete"), failed=_is(k8s_job, "Failed"),
                                         suspended=bool(k8s_job.spec.suspend))
    return found


def pod_exits(pods: list[Any]) -> tuple[PodExit, ...]:
    """The containers of these pods that ended with a non-zero code."""
    exits = []
    for pod in pods:
        for container in pod.status.container_statuses or []:
            terminated = container.state and container.state.terminated
            if terminated and terminated.exit_code:
                exits.append(PodExit(pod.metadata.name, terminated.exit_code, terminated.reason, terminated.message))
    return tuple(exits)


def gang_state(job: LongCatI2VJob, credentials: S3Credentials | None, attempt: int,
               suspend_request: bool | None = None) -> Observed:
    """The attempts, the current attempt's pods and the trainer's progress.json."""
    namespace, name = job.metadata.namespace, job.metadata.name
    pods = kube.pods_of(namespace, f"{gang.LABEL_JOB}={name},{gang.LABEL_ATTEMPT}={attempt}")
    return Observed(
        attempts=attempts(namespace, name),
        running_pods=sum(1 for pod in pods if pod.status.phase == "Running"),
        exits=pod_exits(pods),
        progress=progress(job, credentials),
        suspend_request=suspend_request,
    )
