"""The few Kubernetes API calls the operator makes, over the official client.

Creation is create-or-adopt: names are deterministic, so a replayed event, an operator restart or a second
replica finds the object already there and takes it as its own instead of making another.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from longcat_job.api import GROUP, PLURAL, SECRET_ACCESS_KEY_ID, VERSION
from longcat_job.s3 import S3Credentials


class OwnershipError(RuntimeError):
    """An object with the name we need exists and belongs to something else."""


class Conflict(Exception):
    """A write made on the condition that the object is still at a resourceVersion found it changed."""


@functools.cache
def api_client() -> client.ApiClient:
    """One client, so its connection pool (and TLS sessions) serve every call.

    In a pod, the ServiceAccount; elsewhere, the kubeconfig (KUBECONFIG or ~/.kube/config).
    """
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        # The client reads KUBECONFIG when it is imported; read it now, as kubectl does.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration)
    configuration.connection_pool_maxsize = 32
    return client.ApiClient(configuration)


def core() -> client.CoreV1Api:
    return client.CoreV1Api(api_client())


def batch() -> client.BatchV1Api:
    return client.BatchV1Api(api_client())


def _create(kind: str, namespace: str, body: dict[str, Any]) -> None:
    creators = {
        "ConfigMap": lambda: core().create_namespaced_config_map(namespace, body),
        "Service": lambda: core().create_namespaced_service(namespace, body),
        "Job": lambda: batch().create_namespaced_job(namespace, body),
    }
    creators[kind]()


def _read(kind: str, namespace: str, name: str) -> Any:
    readers = {
        "ConfigMap": lambda: core().read_namespaced_config_map(name, namespace),
        "Service": lambda: core().read_namespaced_service(name, namespace),
        "Job": lambda: batch().read_namespaced_job(name, namespace),
    }
    return readers[kind]()


def create_or_adopt(body: dict[str, Any]) -> bool:
    """Creates the object; if it exists and our owner controls it, leaves it. Returns True when created."""
    meta = body["metadata"]
    try:
        _create(body["kind"], meta["namespace"], body)
        return True
    except ApiException as exc:
        if exc.status != 409:
            raise
    existing = _read(body["kind"], meta["namespace"], meta["name"])
    owner_uid = meta["ownerReferences"][0]["uid"]
    owners = existing.metadata.owner_references or []
    if not any(ref.uid == owner_uid for ref in owners):
        raise OwnershipError(
            f"{body['kind']} {meta['namespace']}/{meta['name']} already exists and is not owned by this job: "
            "delete or rename it"
        )
    return False


def read_job(namespace: str, name: str) -> Any | None:
    try:
        return batch().read_namespaced_job(name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def delete_job(namespace: str, name: str) -> None:
    """Deletes a gang attempt and, in the background, its pods."""
    _ignore_missing(functools.partial(batch().delete_namespaced_job, propagation_policy="Background"), name, namespace)


def _ignore_missing(delete: Any, name: str, namespace: str) -> None:
    try:
        delete(name, namespace)
    except ApiException as exc:
        if exc.status != 404:
            raise


def delete_service(namespace: str, name: str) -> None:
    _ignore_missing(core().delete_namespaced_service, name, namespace)


def delete_config_map(namespace: str, name: str) -> None:
    _ignore_missing(core().delete_namespaced_config_map, name, namespace)


def set_job_suspended(namespace: str, name: str, suspended: bool) -> None:
    batch().patch_namespaced_job(name, namespace, {"spec": {"suspend": suspended}})


def pods_of(namespace: str, selector: str) -> list[Any]:
    return core().list_namespaced_pod(namespace, label_selector=selector).items


def jobs_of(namespace: str, selector: str) -> list[Any]:
    return batch().list_namespaced_job(namespace, label_selector=selector).items


def may_get_secret(namespace: str, name: str, user: dict[str, Any]) -> bool:
    """Whether `user` (an admission request's userInfo) may `get` Secret `name`: a SubjectAccessReview."""
    review = client.V1SubjectAccessReview(spec=client.V1SubjectAccessReviewSpec(
        user=user.get("username"), groups=user.get("groups"), uid=user.get("uid"), extra=user.get("extra"),
        resource_attributes=client.V1ResourceAttributes(namespace=namespace, verb="get", resource="secrets",
                                                         name=name),
    ))
    return bool(client.AuthorizationV1Api(api_client()).create_subject_access_review(review).status.allowed)


def read_credentials(namespace: str, secret_name: str) -> S3Credentials:
    """The S3 credentials of a Secret; a missing Secret or key raises with a message that names them."""
    try:
        secret = core().read_namespaced_secret(secret_name, namespace)
    except ApiException as exc:
        if exc.status == 404:
            raise LookupError(
                f"Secret '{secret_name}' (named by credentialsSecret) does not exist in namespace '{namespace}': "
                f"create it with keys {SECRET_ACCESS_KEY_ID} and AWS_SECRET_ACCESS_KEY"
            ) from None
        raise
    return S3Credentials.from_secret_data(secret.data, secret_name)


def patch_status(namespace: str, name: str, status: dict[str, Any], *, resource_version: str | None = None) -> str:
    """Merges `status` into the job's status and returns the job's new resourceVersion. With `resource_version`,
    only if the job is still at that version (the API server checks it as for an update): otherwise raises
    Conflict and writes nothing."""
    body: dict[str, Any] = {"status": status}
    if resource_version is not None:
        body["metadata"] = {"resourceVersion": resource_version}
    try:
        written = client.CustomObjectsApi(api_client()).patch_namespaced_custom_object_status(
            GROUP, VERSION, namespace, PLURAL, name, body
        )
    except ApiException as exc:
        if exc.status == 409:
            raise Conflict(f"{namespace}/{name} changed since resourceVersion {resource_version}") from None
        raise
    return str(written["metadata"]["resourceVersion"])
