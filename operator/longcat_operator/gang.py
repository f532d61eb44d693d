"""Pure functions from a LongCatI2VJob to the Kubernetes objects of its gang: no API calls here.

One job becomes a ConfigMap (the resolved job, no credentials), a headless Service, and an Indexed Job of
`nodes` pods running `torchrun` with the rendezvous on pod 0. Each gang attempt gets its own Job name
(`<job>-a<attempt>`), so a restart never races the deletion of the previous attempt's pods.
"""

from __future__ import annotations

from typing import Any

from longcat_job.api import (
    GROUP,
    MODEL_CACHE_ENV,
    SECRET_ACCESS_KEY_ID,
    SECRET_SECRET_ACCESS_KEY,
    LongCatI2VJob,
    S3Access,
)
from longcat_job.failures import InvalidConfigError

from .settings import OperatorSettings

CONFIG_KEY = "job.json"
CONFIG_DIR = "/etc/longcat"
MODEL_CACHE_DIR = "/cache/models"
HF_CACHE_ENV = "HF_HUB_CACHE"  # huggingface_hub's own cache, for hf:// sources
LABEL_JOB = f"{GROUP}/job"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_QUEUE = "kueue.x-k8s.io/queue-name"
TRAINER_UID = 10001
# Pre-emption gives about 30 s after SIGTERM: the trainer saves a checkpoint in that window.
GRACE_PERIOD_S = 60


class GangError(InvalidConfigError):
    """The job cannot be expressed as pods; the message names the field."""


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def service_name(job_name: str) -> str:
    # Service names must start with a letter (DNS-1035); job names may start with a digit.
    return f"lcj-{job_name}"


def gang_name(job_name: str, attempt: int) -> str:
    return f"{job_name}-a{attempt}"


def rendezvous_host(job_name: str, attempt: int) -> str:
    """Pod 0 of an Indexed Job is `<job>-0`, reachable as `<job>-0.<service>` through the headless Service."""
    return f"{gang_name(job_name, attempt)}-0.{service_name(job_name)}"


def s3_accesses(job: LongCatI2VJob) -> list[tuple[str, S3Access]]:
    """(field path, access) of every S3 location of the job."""
    spec = job.spec
    found = [(f"spec.datasets[{i}].source.s3", d.source.s3) for i, d in enumerate(spec.datasets) if d.source.s3]
    found += [(f"spec.datasets[{i}].vaeCache.s3", d.vae_cache.s3) for i, d in enumerate(spec.datasets)
              if d.vae_cache and d.vae_cache.s3]
    if spec.output.s3:
        found.append(("spec.output.s3", spec.output.s3))
    if spec.model.storage:
        found.append(("spec.model.storage", spec.model.storage))
    if spec.lora.init_from and spec.lora.init_from.s3:
        found.append(("spec.lora.initFrom.s3", spec.lora.init_from.s3))
    return found


def local_locations(job: LongCatI2VJob) -> list[str]:
    """Paths of the fields that point at local directories, which have no meaning inside a cluster."""
    spec = job.spec
    paths = [f"spec.datasets[{i}].source.local" for i, d in enumerate(spec.datasets) if d.source.local]
    paths += [f"spec.datasets[{i}].vaeCache.local" for i, d in enumerate(spec.datasets)
              if d.vae_cache and d.vae_cache.local]
    if spec.output.local:
        paths.append("spec.output.local")
    if spec.lora.init_from and spec.lora.init_from.local:
        paths.append("spec.lora.initFrom.local")
    return paths


def credentials_secret(job: LongCatI2VJob) -> str | None:
    """The one Secret every S3 location of the job uses; the pods get it as AWS_* variables."""
    names = {access.credentials_secret for _, access in s3_accesses(job) if access.credentials_secret}
    if len(names) > 1:
        raise GangError(
            f"the job's S3 locations name several credentials Secrets ({', '.join(sorted(names))}): a gang reads "
            "one set of credentials, so give every credentialsSecret the same Secret"
        )
    return names.pop() if names else None


def resolved(job: LongCatI2VJob, settings: OperatorSettings) -> LongCatI2VJob:
    """The job as the trainer receives it: S3 locations without an endpoint get the operator's default."""
    job = job.model_copy(deep=True)
    job.status = None
    if settings.default_s3_endpoint:
        for _, access in s3_accesses(job):
            if access.endpoint is None:
                access.endpoint = settings.default_s3_endpoint
    return job


def _metadata(job: LongCatI2VJob, name: str, owner: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.metadata.namespace,
        "labels": {LABEL_JOB: job.metadata.name, **labels},
        "ownerReferences": [
            {
                "apiVersion": owner["apiVersion"],
                "kind": owner["kind"],
                "name": owner["metadata"]["name"],
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def config_map(job: LongCatI2VJob, settings: OperatorSettings, owner: dict[str, Any]) -> dict[str, Any]:
    text = resolved(job, settings).model_dump_json(by_alias=True, exclude_none=True, indent=2)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.metadata.name), owner, {}),
        "data": {CONFIG_KEY: text},
    }


def service(job: LongCatI2VJob, settings: OperatorSettings, owner: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, service_name(job.metadata.name), owner, {}),
        "spec": {
            "clusterIP": "None",
            # Rendezvous happens before any pod is Ready: its DNS name must resolve from the start.
            "publishNotReadyAddresses": True,
            "selector": {LABEL_JOB: job.metadata.name},
            "ports": [
                {"name": "rendezvous", "port": settings.rendezvous_port},
                {"name": "metrics", "port": settings.metrics_port},
            ],
        },
    }


def _secret_env(secret: str, key: str, optional: bool = False) -> dict[str, Any]:
    return {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": optional}}}


def _trainer_env(job: LongCatI2VJob, settings: OperatorSettings, attempt: int) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "LONGCAT_JOB_NAME", "value": job.metadata.name},
        {"name": "LONGCAT_ATTEMPT", "value": str(attempt)},
        {"name": "LONGCAT_METRICS_PORT", "value": str(settings.metrics_port)},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "HOME", "value": "/tmp"},
    ]
    secret = credentials_secret(job)
    if secret:
        env += [_secret_env(secret, SECRET_ACCESS_KEY_ID), _secret_env(secret, SECRET_SECRET_ACCESS_KEY)]
    if job.spec.model.hf_token_secret:
        env.append(_secret_env(job.spec.model.hf_token_secret, "HF_TOKEN"))
    if job.spec.resources.model_cache:
        env += [{"name": MODEL_CACHE_ENV, "value": MODEL_CACHE_DIR},
                {"name": HF_CACHE_ENV, "value": f"{MODEL_CACHE_DIR}/huggingface"}]
    return env


def torchrun_command(job: LongCatI2VJob, settings: OperatorSettings, attempt: int) -> list[str]:
    resources = job.spec.resources
    master = "127.0.0.1" if resources.nodes == 1 else rendezvous_host(job.metadata.name, attempt)
    return [
        "torchrun",
        f"--nnodes={resources.nodes}",
        f"--nproc-per-node={resources.gpus_per_node}",
        # The Job controller sets JOB_COMPLETION_INDEX on each pod; the kubelet expands $(...) from env.
        "--node-rank=$(JOB_COMPLETION_INDEX)",
        f"--master-addr={master}",
        f"--master-port={settings.rendezvous_port}",
        "-m",
        "longcat_trainer",
        "--config",
        f"{CONFIG_DIR}/{CONFIG_KEY}",
    ]


def indexed_job(job: LongCatI2VJob, settings: OperatorSettings, owner: dict[str, Any], attempt: int) -> dict[str, Any]:
    spec = job.spec
    resources = spec.resources
    name = job.metadata.name
    labels = {LABEL_ATTEMPT: str(attempt)}
    job_labels = {**labels, LABEL_QUEUE: resources.queue_name} if resources.queue_name else labels
    gpus = {settings.gpu_resource: str(resources.gpus_per_node)}
    pod_spec: dict[str, Any] = {
        "subdomain": service_name(name),
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": GRACE_PERIOD_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": TRAINER_UID,
            "runAsGroup": TRAINER_UID,
            "fsGroup": TRAINER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "trainer",
                "image": resources.image or settings.trainer_image,
                "command": torchrun_command(job, settings, attempt),
                "env": _trainer_env(job, settings, attempt),
                # The trainer writes `<reason>: <message>` there; a crash that left none shows its log's tail.
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "ports": [
                    {"name": "metrics", "containerPort": settings.metrics_port},
                    {"name": "rendezvous", "containerPort": settings.rendezvous_port},
                ],
                "resources": {"limits": gpus, "requests": gpus},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "scratch", "mountPath": "/tmp"},
                ],
            }
        ],
        "volumes": [
            {"name": "config", "configMap": {"name": config_map_name(name)}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": resources.shm_size}},
            {"name": "scratch", "emptyDir": {}},
        ],
    }
    if resources.model_cache:
        pod_spec["volumes"].append(
            {"name": "model-cache", "persistentVolumeClaim": {"claimName": resources.model_cache.claim_name}})
        pod_spec["containers"][0]["volumeMounts"].append({"name": "model-cache", "mountPath": MODEL_CACHE_DIR})
    if resources.node_selector:
        pod_spec["nodeSelector"] = dict(resources.node_selector)
    if resources.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in resources.tolerations]
    if resources.priority_class_name:
        pod_spec["priorityClassName"] = resources.priority_class_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _metadata(job, gang_name(name, attempt), owner, job_labels),
        "spec": {
            "completionMode": "Indexed",
            "completions": resources.nodes,
            "parallelism": resources.nodes,
            # Any failed pod fails the Job: the operator restarts the whole gang from the last checkpoint.
            "backoffLimit": 0,
            # Kueue admits a queued Job by unsuspending it.
            "suspend": spec.suspend or resources.queue_name is not None,
            "template": {"metadata": {"labels": {LABEL_JOB: name, **labels}}, "spec": pod_spec},
        },
    }
