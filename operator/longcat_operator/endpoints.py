"""Which S3 endpoints a job may make the operator and its pods talk to.

The operator sends signed requests to every endpoint a job names, from its own place in the network, and so do
the job's pods: without a policy, creating a job would let a user probe cluster-internal services and the cloud
metadata service with the operator's network position. Allowed are the operator's default endpoint, AWS's own
S3 endpoints, and what the chart lists in `s3.allowedEndpoints` ('*': any). Link-local and metadata addresses are
refused whatever the list says: no S3 service lives there.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from longcat_job.api import LongCatI2VJob

from .gang import s3_accesses
from .settings import OperatorSettings

# AWS's S3 endpoints: global, regional, dual-stack and FIPS, over HTTPS only.
AWS_S3 = re.compile(r"^https://s3(-fips)?(\.dualstack)?(\.[a-z0-9-]+)?\.amazonaws\.com(\.cn)?$")
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data"})
# IPv4 link-local holds AWS/GCP/Azure's 169.254.169.254; fd00:ec2::254 is AWS's IPv6 metadata address;
# 100.100.100.200 is Alibaba Cloud's.
METADATA_NETWORKS = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"),
                     ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))


def _normalized(endpoint: str) -> str:
    return endpoint.strip().rstrip("/").lower()


def _metadata_address(host: str) -> bool:
    if host in METADATA_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return any((mapped or address) in network for network in METADATA_NETWORKS)


def refusal(endpoint: str, settings: OperatorSettings) -> str | None:
    """Why `endpoint` may not be used, or None."""
    host = (urlsplit(endpoint).hostname or "").lower()
    if _metadata_address(host):
        return (f"endpoint {endpoint} is a link-local or cloud metadata address: S3 is never there, and the "
                "operator does not send requests to it")
    normalized = _normalized(endpoint)
    allowed = {_normalized(e) for e in settings.allowed_endpoints}
    if settings.default_s3_endpoint:
        allowed.add(_normalized(settings.default_s3_endpoint))
    if "*" in allowed or normalized in allowed or AWS_S3.match(normalized):
        return None
    return (f"endpoint {endpoint} is not allowed in this cluster: use the operator's default endpoint or AWS, or "
            "ask the cluster's administrator to add it to the chart's s3.allowedEndpoints")


def refused_endpoints(job: LongCatI2VJob, settings: OperatorSettings) -> list[str]:
    """'<field>.endpoint: <why>' for every S3 location of the (resolved) job whose endpoint may not be used."""
    found = []
    for path, access in s3_accesses(job):
        if access.endpoint is not None and (why := refusal(access.endpoint, settings)):
            found.append(f"{path}.endpoint: {why}")
    return found
