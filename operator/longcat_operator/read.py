"""Reading: what `decide` needs to know about a job, from the API server and the job's S3 locations.

Nothing here changes anything in the cluster; failures that decide the job's fate (an invalid spec, a missing
Secret, bad data) come back as a `Refusal`, not as exceptions. Preflight writes manifest.json: freezing the
samples is part of checking them (DESIGN.md's preflight step).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import kopf
from botocore.exceptions import BotoCoreError, ClientError

from longcat_job.api import LongCatI2VJob
from longcat_job.failures import parse_termination_message
from longcat_job.parse import InvalidJob, parse_job
from longcat_job.preflight import run_preflight
from longcat_job.progress import PROGRESS_KEY, TrainerProgress
from longcat_job.s3 import S3AccessError, S3Credentials
from longcat_job.sample_manifest import build_manifest, write_manifest
from longcat_job.storage import store_for

from . import gang, kube
from .decide import Attempt, Observed, PodExit, Preflight, Refusal
from .endpoints import refused_endpoints
from .metrics import PREFLIGHT_FAILURES, PREFLIGHT_SECONDS
from .settings import OperatorSettings
from .status import DATASET_READY, VALIDATED

# A Secret created right after the job gets this many tries, `SECRET_RETRY_DELAY_S` apart, before the job fails.
SECRET_RETRIES = 3
CREDENTIALS_MAX_AGE_S = 30.0
CREDENTIALS_CACHED = 1024
# (namespace, Secret) -> (when read, credentials); dict operations are atomic under the GIL.
_credentials_cache: dict[tuple[str, str], tuple[float, S3Credentials]] = {}
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
    refused = refused_endpoints(job, settings)
    if refused:
        return job, Refusal(VALIDATED, "EndpointNotAllowed", "; ".join(refused))
    try:
        gang.credentials_secret(job)
    except gang.GangError as exc:
        return job, Refusal(VALIDATED, "InvalidSpec", str(exc))
    return job, None


def secrets_denied(job: LongCatI2VJob, user: dict[str, Any]) -> Refusal | None:
    """The Secrets the job would use that `user` (an admission request's userInfo) may not read themselves:
    creating a job must not lend anyone credentials that RBAC does not give them."""
    secrets = [name for name in (gang.credentials_secret(job), job.spec.model.hf_token_secret) if name]
    namespace = job.metadata.namespace
    denied = [name for name in secrets if not kube.may_get_secret(namespace, name, user)]
    if not denied:
        return None
    who = user.get("username") or "this user"
    return Refusal(VALIDATED, "SecretNotPermitted",
                   f"{who} may not get Secret {', '.join(repr(d) for d in denied)} in namespace {namespace}, which "
                   "the job names for its credentials: a job can only use Secrets its author may read (ask for "
                   "`get` on that Secret, or name one you may read)")


def credentials(job: LongCatI2VJob, retry: int, *, max_age_s: float = 0.0
                ) -> tuple[S3Credentials | None, Refusal | None]:
    """The credentials of the job's Secret (None: the pod's own identity). A missing Secret is retried a few
    times (kopf.TemporaryError) before it refuses the job: it is often created just after the job.

    `max_age_s`: a copy read that recently serves (the timer's passes read progress.json of every running job
    every few seconds; a rotated Secret is seen within that age)."""
    secret = gang.credentials_secret(job)
    if secret is None:
        return None, None
    key = (job.metadata.namespace, secret)
    cached = _credentials_cache.get(key)
    if cached is not None and time.monotonic() - cached[0] < max_age_s:
        return cached[1], None
    try:
        found = kube.read_credentials(job.metadata.namespace, secret)
        _credentials_cache[key] = (time.monotonic(), found)
        while len(_credentials_cache) > CREDENTIALS_CACHED:
            _credentials_cache.pop(next(iter(_credentials_cache)))
        return found, None
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
        # What stopped the job: its blocking problems, or else the kinds of the samples there were too many of.
        problems = [p for d in result.report.datasets for p in d.problems]
        reasons = {p.kind.value for p in problems if p.severity == "error"}
        reasons |= {"access" for d in result.report.datasets if d.access_error}
        reasons |= {"spec"} if result.report.spec_problems else set()
        if not reasons and result.report.too_many_unusable:
            reasons = {p.kind.value for p in problems if p.severity == "sample"}
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
                failure, message = parse_termination_message(terminated.message or "")
                exits.append(PodExit(pod.metadata.name, terminated.exit_code, terminated.reason, message or None,
                                     failure))
    return tuple(exits)


def gang_state(job: LongCatI2VJob, credentials: Callable[[], S3Credentials | None], attempt: int,
               suspend_request: bool | None = None, now: datetime | None = None) -> Observed:
    """The attempts, the current attempt's pods and, once one of them has started, the trainer's progress.json
    (`credentials` is asked only then: a gang waiting for nodes costs no Secret read and no S3 request)."""
    namespace, name = job.metadata.namespace, job.metadata.name
    pods = kube.pods_of(namespace, f"{gang.LABEL_JOB}={name},{gang.LABEL_ATTEMPT}={attempt}")
    started = any(pod.status.phase in ("Running", "Succeeded", "Failed") for pod in pods)
    return Observed(
        attempts=attempts(namespace, name),
        running_pods=sum(1 for pod in pods if pod.status.phase == "Running"),
        exits=pod_exits(pods),
        progress=progress(job, credentials()) if started else None,
        suspend_request=suspend_request,
        now=now,
    )