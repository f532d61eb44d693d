"""`longcat-i2v serve`: the job browser and preview on 127.0.0.1:8000 by default."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

import uvicorn

from .app import Server
from .locations import output_store
from .preview_worker import Mp4Generator, unavailable

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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="longcat-i2v serve", description="Job browser and LoRA preview.")
    parser.add_argument("--output", metavar="DIR|s3://BUCKET/PREFIX",
                        help="a job's output location, or a folder of them (S3: endpoint and keys from AWS_*)")
    parser.add_argument("--model", metavar="SOURCE", help="the checkpoint previews sample with (default: each "
                        "job's own spec.model.source, from its job.json)")
    parser.add_argument("--cluster", action="store_true",
                        help="also list the cluster's LongCatI2VJobs (kubeconfig; always on inside a pod)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    if args.output is None and not (args.cluster or "KUBERNETES_SERVICE_HOST" in os.environ):
        parser.error("pass --output DIR|s3://BUCKET/PREFIX (a job's output or a folder of jobs), or --cluster")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        store = output_store(args.output) if args.output else None
    except ValueError as exc:
        raise SystemExit(f"longcat-i2v serve: {exc}") from None
    server = Server(store, model=args.model, custom_objects=cluster_client(args.cluster), generate=Mp4Generator(),
                    unavailable=unavailable)
    log.info("serving %s on http://%s:%d/", args.output or "the cluster's jobs", args.host, args.port)
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level="warning")
    return 0
