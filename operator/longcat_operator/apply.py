"""Applying a decision: the status first, then the actions (create, delete, suspend, events, metrics).

The status is written on the condition that the job is still at the version it was read at, when the caller
says so: a pass that acted on an old copy of the job (kopf's timers use the last one the watch delivered)
finds the write refused and does nothing else; the next pass reads again.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import kopf

from longcat_job.api import JobStatus, LongCatI2VJob

from . import gang, kube
from . import status as transitions
from .decide import Action, CountRestart, CreateAttempt, Decision, DeleteAttempts, DeleteGang, Emit, SetSuspended
from .metrics import GANG_RESTARTS, QUEUE_LATENCY
from .settings import OperatorSettings

log = logging.getLogger(__name__)


def apply(body: kopf.Body, job: LongCatI2VJob | None, old: JobStatus, decision: Decision,
          settings: OperatorSettings, *, resource_version: str | None = None) -> str | None:
    """The job's resourceVersion after the status write (`resource_version` when nothing was written), or None
    when the write was refused because the job changed since `resource_version` (then nothing is done).

    `job` is None only for a document that is not a valid job: its decision holds no gang actions."""
    namespace, name = body.metadata.namespace, body.metadata.name
    version = resource_version
    if decision.status != old:
        try:
            version = kube.patch_status(namespace, name, transitions.dump(decision.status),
                                        resource_version=resource_version)
        except kube.Conflict:
            log.debug("%s/%s changed since this pass read it; the next pass decides again", namespace, name)
            return None
    for action in decision.actions:
        _run(action, body, job, settings)
    return version or ""


def _run(action: Action, body: kopf.Body, job: LongCatI2VJob | None, settings: OperatorSettings) -> None:
    namespace, name = body.metadata.namespace, body.metadata.name
    match action:
        case CreateAttempt(number):
            assert job is not None
            if create_attempt(job, owner(body), number, settings) and number == 0:
                created = datetime.fromisoformat(body.metadata["creationTimestamp"].replace("Z", "+00:00"))
                QUEUE_LATENCY.observe(max(0.0, (datetime.now(UTC) - created).total_seconds()))
        case DeleteAttempts(numbers):
            for number in numbers:
                kube.delete_job(namespace, gang.gang_name(name, number))
        case DeleteGang(numbers):
            _run(DeleteAttempts(numbers), body, job, settings)
            kube.delete_service(namespace, gang.service_name(name))
            kube.delete_config_map(namespace, gang.config_map_name(name))
        case SetSuspended(number, suspended):
            kube.set_job_suspended(namespace, gang.gang_name(name, number), suspended)
        case Emit(type_, reason, message):
            kopf.event(body, type=type_, reason=reason, message=message)
        case CountRestart():
            GANG_RESTARTS.labels(namespace=namespace, job=name).inc()


def owner(body: kopf.Body) -> dict[str, Any]:
    return {"apiVersion": body["apiVersion"], "kind": body["kind"],
            "metadata": {"name": body.metadata.name, "uid": body.metadata.uid}}


def create_attempt(job: LongCatI2VJob, owner: dict[str, Any], number: int, settings: OperatorSettings) -> bool:
    """Creates (or adopts) the ConfigMap, Service and attempt `number`'s Job; True when the Job is new."""
    kube.create_or_adopt(gang.config_map(job, settings, owner))
    kube.create_or_adopt(gang.service(job, settings, owner))
    return kube.create_or_adopt(gang.indexed_job(job, settings, owner, number))
