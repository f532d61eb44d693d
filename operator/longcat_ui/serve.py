"""`longcat-i2v serve`: the job browser and preview on 127.0.0.1:8000 by default."""

from __future__ import annotations

import logging
import os

import uvicorn

from .app import Server
from .locations import output_store
from .preview_worker import generate_mp4, unavailable

log = logging.getLogger(__name__)


def cluster_client(wanted: bool) -> object | None:
    """The CustomObjectsApi to list LongCatI2VJobs with: in a pod its ServiceAccount's, else (with --cluster)
    the kubeconfig's; None outside a cluster unless asked."""
    in_pod = "KUBERNETES_SERVICE_HOST" in os.environ
    if not (wanted or in_pod):
        return None
    from kubernetes import client, config  # noqa: PLC0415 - only where there is a cluster

    if in_pod:
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.CustomObjectsApi()


def serve(output: str | None, *, model: str | None, host: str, port: int, cluster: bool) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        store = output_store(output) if output else None
    except ValueError as exc:
        raise SystemExit(f"longcat-i2v serve: {exc}") from None
    server = Server(store, model=model, custom_objects=cluster_client(cluster), generate=generate_mp4,
                    unavailable=unavailable)
    log.info("serving %s on http://%s:%d/", output or "the cluster's jobs", host, port)
    uvicorn.run(server.app(), host=host, port=port, log_level="warning")
    return 0
