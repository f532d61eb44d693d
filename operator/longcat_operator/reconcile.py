"""The kopf handlers. Each pass reads (read.py), decides (decide.py, pure) and applies (apply.py):

launch   (create, resume)  validate -> preflight -> manifest.json -> ConfigMap, Service, Indexed Job
observe  (timer)           mirror the gang and progress.json into status; restart the gang on failure
suspend  (spec.suspend)    suspend or resume the gang

No finalizer: nothing has to happen before a job is gone (its ConfigMap, Service and Jobs go with it by their
owner references, its artifacts stay in S3), so `kubectl delete lcj` works with the operator down or
uninstalled. kopf puts its finalizer on every object a timer runs for, only to stop that timer before the
object goes; here the timer stops instead when the watch reports the job DELETED (its filter stops matching).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import kopf

from longcat_job.api import GROUP, PLURAL, VERSION
from longcat_job.s3 import S3Credentials

from . import read
from . import status as transitions
from .apply import apply
from .decide import Observed, decide, ttl_pending
from .metrics import JOBS_BY_PHASE, RECONCILE_SECONDS
from .settings import OperatorSettings

RESOURCE = (GROUP, VERSION, PLURAL)
SETTINGS = OperatorSettings.from_env()
# uids of jobs the watch reported DELETED (the newest few thousand): their timers' filter no longer matches.
_GONE: OrderedDict[str, None] = OrderedDict()
GONE_REMEMBERED = 10_000


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's ServiceAccount in a cluster, else KUBECONFIG as it is when the operator starts.

    In a pod, the API server is reached at the `kubernetes` Service's address from the environment, as client-go
    and the official Python client find it: kopf's default name, kubernetes.default.svc, needs cluster DNS.
    """
    info = kopf.login_with_service_account(**kwargs)
    if info is None:
        return kopf.login_with_kubeconfig(**kwargs)
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if host:
        info = dataclasses.replace(info, server=f"https://{f'[{host}]' if ':' in host else host}:{port}")
    return info


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
def launch(body: kopf.Body, retry: int, logger: logging.Logger, **_: Any) -> None:
    status = transitions.parse(body.status)
    if transitions.is_true(status, transitions.LAUNCHED):
        return  # launched already (a resumed operator, or a retry): the timer keeps the gang going
    generation = body.metadata.get("generation")
    job, refusal = read.validated(body, SETTINGS)
    spec = job.spec if job is not None else None
    decision = decide(body.metadata.name, spec, status, Observed(refusal=refusal), generation)
    # Each write is conditional on the version this pass knows: kopf can hand a handler a copy of the job older
    # than this operator's own last write (its watch lags under load), and a pass on it would launch twice.
    version = apply(body, job, status, decision, SETTINGS, resource_version=body.metadata.get("resourceVersion"))
    if version is None:
        raise kopf.TemporaryError("the job changed since this copy of it; launching from the newer one", delay=1)
    if not decision.needs_preflight:
        return
    assert job is not None  # a refused job needs no preflight
    # Validating is in the status while preflight lists the datasets (a minute for 20,000 pairs).
    credentials, refusal = read.credentials(job, retry)
    preflight = read.preflight(job, credentials) if refusal is None else None
    launched = decide(job.metadata.name, job.spec, decision.status, Observed(refusal=refusal, preflight=preflight),
                      generation)
    if transitions.is_launched(launched.status):  # logged first: the status tells watchers it happened
        logger.info("launched %s/%s", job.metadata.namespace, job.metadata.name)
    if apply(body, job, decision.status, launched, SETTINGS, resource_version=version) is None:
        raise kopf.TemporaryError("the job changed during preflight; launching again from its newer copy", delay=1)


def admit(body: kopf.Body, operation: str | None, userinfo: dict[str, Any] | None, **_: Any) -> None:
    """The optional webhook: refuses at `kubectl apply` what the operator would fail at launch and CEL cannot
    say (local directories in a cluster, several credentials Secrets, endpoints outside the allow-list), with
    the same message; and, at creation, a job naming a Secret its author may not read (the Secrets a job names
    cannot change afterwards: model, datasets and output are immutable)."""
    job, refusal = read.validated(body, SETTINGS)
    if refusal is None and job is not None and operation == "CREATE":
        refusal = read.secrets_denied(job, userinfo or {})
    if refusal is not None:
        raise kopf.AdmissionError(refusal.message, code=422 if refusal.reason != "SecretNotPermitted" else 403)


# kopf refuses to start with an admission handler but no server, so the handler exists only with the webhook.
if SETTINGS.webhook_port:
    kopf.on.validate(*RESOURCE, id="validate-job")(admit)


def _is_launched(status: kopf.Status, **_: Any) -> bool:
    return transitions.is_launched(transitions.parse(status))


def _is_observed(spec: kopf.Spec, status: kopf.Status, meta: kopf.Meta, **_: Any) -> bool:
    """The timer's filter: a job that still exists, launched and running, or finished with its gang still to
    remove (ttlSecondsAfterFinished). kopf stops a timer whose filter stops matching."""
    if meta.get("uid") in _GONE:
        return False
    parsed = transitions.parse(status)
    return transitions.is_launched(parsed) or ttl_pending(spec.get("ttlSecondsAfterFinished"), parsed)


def _without_finalizer(fn: Any) -> Any:
    """`fn`'s kopf timer, registered without the finalizer kopf gives every timer (see the module docstring).

    kopf's decorator has no option for it; the handler it registered is replaced by a copy that does not ask
    for a finalizer. tests/test_operator.py checks that no job ever gets one.
    """
    registry = kopf.get_default_registry()
    spawning = registry._spawning  # noqa: SLF001 - the one place kopf keeps the timer's finalizer flag
    spawning._handlers = [  # noqa: SLF001
        dataclasses.replace(h, requires_finalizer=False) if h.fn is fn else h for h in spawning._handlers  # noqa: SLF001
    ]
    return fn


def _pass(body: kopf.Body, suspend_request: bool | None = None) -> bool:
    """One read -> decide -> apply of a launched job's gang; False when the body was older than the job."""
    job = read.job_of(body, SETTINGS)
    status = transitions.parse(body.status)
    if status.phase in transitions.TERMINAL:  # only its TTL is left to watch: the attempts, no pods, no S3
        observed = Observed(attempts=read.attempts(job.metadata.namespace, job.metadata.name), now=transitions.now())
    else:
        def credentials() -> S3Credentials | None:  # a Secret gone mid-run: progress unread
            return read.credentials(job, retry=read.SECRET_RETRIES, max_age_s=read.CREDENTIALS_MAX_AGE_S)[0]

        observed = read.gang_state(job, credentials, status.restarts, suspend_request, now=transitions.now())
    decision = decide(job.metadata.name, job.spec, status, observed, body.metadata.get("generation"))
    return apply(body, job, status, decision, SETTINGS,
                 resource_version=body.metadata.get("resourceVersion")) is not None


@_without_finalizer
# The first tick waits an interval: the launch pass writes Launched before it creates the gang, and a tick in
# between would find no Job and make it again.
@kopf.timer(*RESOURCE, interval=SETTINGS.progress_interval_s, initial_delay=SETTINGS.progress_interval_s,
            when=_is_observed)
@_timed("observe")
def observe(body: kopf.Body, **_: Any) -> None:
    # A stale body is dropped: the next tick has the watch's newer copy.
    _pass(body)


@kopf.on.field(*RESOURCE, field="spec.suspend")
@_timed("suspend")
def suspend(body: kopf.Body, new: bool | None, **_: Any) -> None:
    if not _is_launched(body.status):
        return
    if not _pass(body, suspend_request=bool(new)):
        raise kopf.TemporaryError("the job changed while its suspension was handled; trying again", delay=1)


@kopf.on.event(*RESOURCE)
def track_phase(event: dict[str, Any], body: kopf.Body, **_: Any) -> None:
    if event["type"] == "DELETED":
        # kopf handles this event's on-event handlers before its timers: the filter already sees it gone.
        _GONE[body.metadata.uid] = None
        while len(_GONE) > GONE_REMEMBERED:
            _GONE.popitem(last=False)
        JOBS_BY_PHASE.forget(body.metadata.namespace, body.metadata.name)
    else:
        JOBS_BY_PHASE.observe(body.metadata.namespace, body.metadata.name, body.status.get("phase"))
