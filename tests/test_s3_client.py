"""The shared S3 client configuration, credentials and the messages of access errors."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import botocore.endpoint
import pytest
from botocore.exceptions import EndpointConnectionError
from pydantic import SecretStr

from longcat_job import s3
from longcat_job.api import Location, S3Location
from longcat_job.s3 import OPERATOR, TRAINER, RetryBudget, S3AccessError, S3Credentials, client_config, make_client
from longcat_job.storage import S3Store, store_for
from tests.fixtures.cluster import free_port
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


@pytest.fixture
def trainer_budget() -> Iterator[None]:
    """The process's clients get the trainer's budget (as under `python -m longcat_trainer`) for one test."""
    s3.use_budget(TRAINER)
    yield
    s3.use_budget(OPERATOR)


def test_client_is_path_style_with_adaptive_retries_and_timeouts() -> None:
    client = make_client("http://127.0.0.1:9", "eu-west-1")
    config = client.meta.config
    assert client.meta.region_name == "eu-west-1"
    assert config.s3["addressing_style"] == "path"
    assert config.retries == {"mode": "adaptive", "total_max_attempts": OPERATOR.max_attempts}
    assert (config.connect_timeout, config.read_timeout) == (OPERATOR.connect_timeout, OPERATOR.read_timeout)


def test_trainer_budget_is_longer_than_the_operators_and_overridable() -> None:
    trainer, operator = client_config(TRAINER), client_config(OPERATOR)
    assert operator.retries["total_max_attempts"] == 5
    assert trainer.retries["total_max_attempts"] == 18
    assert trainer.connect_timeout == operator.connect_timeout and trainer.read_timeout == operator.read_timeout
    assert client_config(max_attempts=1, connect_timeout=1).retries["total_max_attempts"] == 1  # tests' fast fail


def test_use_budget_applies_to_clients_made_afterwards(trainer_budget: None) -> None:
    assert make_client("http://127.0.0.1:9").meta.config.retries["total_max_attempts"] == TRAINER.max_attempts
    shared = s3.shared_client("http://127.0.0.1:9", None, None)
    assert shared.meta.config.retries["total_max_attempts"] == TRAINER.max_attempts
    s3.use_budget(OPERATOR)  # a client cached under the old budget is not handed out any more
    assert s3.shared_client("http://127.0.0.1:9", None, None).meta.config.retries["total_max_attempts"] == 5


def _backoff_waits(budget: RetryBudget, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The sleeps botocore chooses between the attempts of one request to a port nobody listens on."""
    waits: list[float] = []
    monkeypatch.setattr(botocore.endpoint, "time", SimpleNamespace(sleep=waits.append))
    creds = S3Credentials(access_key_id="AKID", secret_access_key=SecretStr("not-a-secret"))
    client = make_client(f"http://127.0.0.1:{free_port()}", credentials=creds, config=client_config(budget))
    with pytest.raises(EndpointConnectionError):
        client.head_object(Bucket="b", Key="k")
    return waits


def test_trainer_rides_out_a_minute_and_the_operator_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # botocore's waits are random (full jitter): average a few requests, each on a client of its own (the
    # retry quota is per client).
    trainer = [_backoff_waits(TRAINER, monkeypatch) for _ in range(8)]
    operator = _backoff_waits(OPERATOR, monkeypatch)
    assert all(len(waits) == TRAINER.max_attempts - 1 for waits in trainer)  # the quota cut none short
    assert len(operator) == OPERATOR.max_attempts - 1
    assert sum(map(sum, trainer)) / len(trainer) > 60  # 92.8 s expected, see s3.TRAINER
    assert max(map(sum, trainer)) <= 185.6 and sum(operator) <= 0.75


def test_trainer_threads_ride_out_an_outage_together(trainer_budget: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Four threads stalled by one outage each keep their whole budget: botocore's retry quota (35 retries
    per client) would cut a shared client's requests short, so the trainer's clients are per thread, also
    when the threads share one store built elsewhere (as the reader's workers do)."""
    waits: dict[int, list[float]] = {}
    monkeypatch.setattr(botocore.endpoint, "time",
                        SimpleNamespace(sleep=lambda s: waits.setdefault(threading.get_ident(), []).append(s)))
    creds = S3Credentials(access_key_id="AKID", secret_access_key=SecretStr("not-a-secret"))
    location = Location(s3=S3Location(bucket="clips", endpoint=f"http://127.0.0.1:{free_port()}"))
    store = store_for(location, what="dataset 'clips'", credentials=lambda _: creds)

    def request(_: int) -> int:
        with pytest.raises(S3AccessError, match="dataset 'clips'"):
            store.stat("k")
        return id(store.client.meta)  # the calling thread's client (and its retry quota)

    with ThreadPoolExecutor(4) as pool:
        clients = set(pool.map(request, range(4)))
    assert len(clients) == 4
    assert len(waits) == 4 and all(len(w) == TRAINER.max_attempts - 1 for w in waits.values())


def test_operator_threads_share_one_client() -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    first = s3.shared_client(endpoint, None, None)
    with ThreadPoolExecutor(4) as pool:
        clients = list(pool.map(lambda _: s3.shared_client(endpoint, None, None), range(4)))
    assert all(c is first for c in clients)


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
