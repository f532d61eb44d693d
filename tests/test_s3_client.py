"""The shared S3 client configuration, credentials and the messages of access errors."""

from __future__ import annotations

import base64

import pytest

from longcat_operator.api import Location, S3Location
from longcat_operator.s3 import MAX_ATTEMPTS, S3AccessError, S3Credentials, make_client
from longcat_operator.storage import S3Store, store_for
from tests.fixtures.s3 import S3Server


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def test_credentials_from_secret_data_and_env_hide_the_secret() -> None:
    creds = S3Credentials.from_secret_data(
        {"AWS_ACCESS_KEY_ID": _b64("AKID"), "AWS_SECRET_ACCESS_KEY": _b64("s3cr3t-value")}, "data-creds"
    )
    assert creds.access_key_id == "AKID"
    assert creds.secret_access_key.get_secret_value() == "s3cr3t-value"
    assert "s3cr3t-value" not in repr(creds) and "s3cr3t-value" not in str(creds)
    assert S3Credentials.from_env(creds.as_env()) == creds
    assert S3Credentials.from_env({}) is None


def test_secret_without_keys_names_the_secret_and_the_missing_key() -> None:
    with pytest.raises(S3AccessError, match=r"Secret 'data-creds' lacks AWS_SECRET_ACCESS_KEY"):
        S3Credentials.from_secret_data({"AWS_ACCESS_KEY_ID": _b64("AKID")}, "data-creds")
    with pytest.raises(S3AccessError, match=r"AWS_SECRET_ACCESS_KEY is not valid base64") as caught:
        S3Credentials.from_secret_data({"AWS_ACCESS_KEY_ID": _b64("AKID"), "AWS_SECRET_ACCESS_KEY": "s3cr3t!!"}, "x")
    assert "s3cr3t" not in str(caught.value)


def test_client_is_path_style_with_adaptive_retries_and_timeouts() -> None:
    client = make_client("http://127.0.0.1:9", "eu-west-1")
    config = client.meta.config
    assert client.meta.region_name == "eu-west-1"
    assert config.s3["addressing_style"] == "path"
    assert config.retries["mode"] == "adaptive"
    assert config.retries["total_max_attempts"] == MAX_ATTEMPTS
    assert config.connect_timeout and config.read_timeout


@pytest.mark.s3
def test_store_for_location_reads_with_explicit_credentials(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="clips/a.mp4", Body=b"12345")
    location = Location(s3=S3Location(bucket=s3_bucket, prefix="clips", endpoint=s3_server.endpoint,
                                      credentials_secret="data-creds"))
    seen = []

    def lookup(name: str | None) -> S3Credentials:
        seen.append(name)
        return s3_server.credentials

    store = store_for(location, what="dataset 'clips'", credentials=lookup)
    assert isinstance(store, S3Store) and seen == ["data-creds"]
    records = list(store.list())
    assert [(r.key, r.size) for r in records] == [("a.mp4", 5)]
    assert store.url == f"s3://{s3_bucket}/clips/"
    with store.open_ranged("a.mp4") as f:
        f.seek(2)
        assert f.read(2) == b"34"
