"""The S3 endpoint allow-list: what a job may make the operator and its pods talk to."""

from __future__ import annotations

import copy

import pytest

from longcat_job.parse import parse_job
from longcat_operator.endpoints import refusal, refused_endpoints
from longcat_operator.gang import resolved
from longcat_operator.settings import OperatorSettings
from tests.invalid_jobs import MINIMAL

DEFAULT = "http://seaweedfs.storage.svc:8333"
SETTINGS = OperatorSettings(default_s3_endpoint=DEFAULT, allowed_s3_endpoints="http://minio.team-a:9000/, https://s3.example.com")


@pytest.mark.parametrize("endpoint", [
    DEFAULT, DEFAULT + "/", "http://minio.team-a:9000", "HTTPS://S3.EXAMPLE.COM",
    "https://s3.amazonaws.com", "https://s3.eu-west-1.amazonaws.com", "https://s3.dualstack.us-east-2.amazonaws.com",
    "https://s3-fips.us-gov-west-1.amazonaws.com", "https://s3.cn-north-1.amazonaws.com.cn",
])
def test_allowed(endpoint: str) -> None:
    assert refusal(endpoint, SETTINGS) is None


@pytest.mark.parametrize(("endpoint", "why"), [
    ("http://kubernetes.default.svc:443", "not allowed in this cluster"),
    ("http://10.96.0.1", "not allowed in this cluster"),
    ("http://minio.team-a:9001", "not allowed in this cluster"),  # another port of an allowed host
    ("http://s3.amazonaws.com", "not allowed in this cluster"),  # AWS over plain HTTP
    ("https://s3.amazonaws.com.evil.example", "not allowed in this cluster"),
    ("http://169.254.169.254", "metadata address"),
    ("http://[fd00:ec2::254]", "metadata address"),
    ("http://[::ffff:169.254.169.254]", "metadata address"),
    ("http://metadata.google.internal", "metadata address"),
    ("http://100.100.100.200", "metadata address"),
])
def test_refused(endpoint: str, why: str) -> None:
    message = refusal(endpoint, SETTINGS)
    assert message is not None and why in message and endpoint in message


def test_metadata_addresses_are_refused_even_when_anything_is_allowed() -> None:
    anything = OperatorSettings(allowed_s3_endpoints="*")
    assert refusal("http://minio.anywhere:9000", anything) is None
    assert "metadata address" in (refusal("http://169.254.169.254/latest/", anything) or "")


def test_every_location_of_a_job_is_checked_after_the_default_is_filled_in() -> None:
    document = copy.deepcopy(MINIMAL)
    document["spec"]["output"]["s3"]["endpoint"] = "http://169.254.169.254"
    document["spec"]["datasets"][0]["source"]["s3"].pop("endpoint", None)  # gets the operator's default
    job = resolved(parse_job(document), SETTINGS)
    refused = refused_endpoints(job, SETTINGS)
    assert refused == ["spec.output.s3.endpoint: endpoint http://169.254.169.254 is a link-local or cloud metadata "
                       "address: S3 is never there, and the operator does not send requests to it"]
