"""The one S3 client configuration used by the operator, the trainer and the CLI, with a retry budget per role.

Credentials come either from the job's Secret (read by the operator and passed in explicitly) or from the
environment (the trainer's pods get the Secret as AWS_* variables). Errors of access are turned into
messages that name what was being read (a dataset, the output) and the bucket, and never carry a secret.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
from pydantic import BaseModel, ConfigDict, SecretStr

from .failures import FailureReason, StorageError

DEFAULT_REGION = "us-east-1"
# Enough connections for the preflight's concurrent listings and the reader's parallel downloads.
MAX_POOL_CONNECTIONS = 32


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """How long one request keeps trying before it raises: attempts (the first included) and socket timeouts.

    botocore 1.44 ("standard" and "adaptive" modes) sleeps rand(0, 1) * min(0.05 s * 2**i, 20 s) before retry
    i (0-based) after a connection error or a 5xx, and 1 s instead of 0.05 s on throttling (older botocore
    used 1 s for every error: the waits below are then longer). Each retry also takes 14 units of a
    per-client quota of 500 that only successful calls give back: concurrent requests of one client riding
    out one outage share about 35 retries, so a budget of more than 35 retries per request needs a client per
    thread. An attempt itself lasts up to its connect timeout when the endpoint does not answer, and up to its
    read timeout when the server accepts but never replies.
    """

    max_attempts: int
    connect_timeout: float
    # Per socket read, not per object: a slow multi-GB GET is fine as long as bytes keep coming.
    read_timeout: float
    # One client per thread (see the quota above): the trainer's reader downloads in several threads at once.
    client_per_thread: bool = False


# The operator's calls run inside reconcile handlers that the next tick repeats: fail fast. Backoff of 4
# retries: at most 0.05 + 0.1 + 0.2 + 0.4 = 0.75 s (15 s when throttled); 5 * 5 s more when unreachable.
OPERATOR = RetryBudget(max_attempts=5, connect_timeout=5.0, read_timeout=60.0)
# A trainer that gives up costs a gang restart and the steps since the last checkpoint: ride out about a
# minute. Backoff of 17 retries: at most 0.05 * (2**9 - 1) + 8 * 20 = 185.6 s, on average half that (92.8 s);
# 97% of requests keep trying past 60 s, 99% past 54 s. When unreachable, 18 * 5 s more: 275.6 s at most.
TRAINER = RetryBudget(max_attempts=18, connect_timeout=5.0, read_timeout=60.0, client_per_thread=True)
# Every client this process makes uses this budget; the trainer's entry point switches it with `use_budget`.
_budget = OPERATOR
_CACHE_LOCK = threading.Lock()
_SESSION_LOCK = threading.Lock()

ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
SESSION_TOKEN = "AWS_SESSION_TOKEN"
ENDPOINT_URL = "AWS_ENDPOINT_URL"
REGION = "AWS_REGION"


class S3Credentials(BaseModel):
    """Static credentials; the secret parts are SecretStr so that printing the model shows '**********'."""

    model_config = ConfigDict(frozen=True)

    access_key_id: str
    secret_access_key: SecretStr
    session_token: SecretStr | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Credentials | None:
        """The AWS_* variables the trainer's pods get from the Secret; None when they are not set."""
        env = os.environ if env is None else env
        if not env.get(ACCESS_KEY_ID) or not env.get(SECRET_ACCESS_KEY):
            return None
        token = env.get(SESSION_TOKEN)
        return cls(
            access_key_id=env[ACCESS_KEY_ID],
            secret_access_key=SecretStr(env[SECRET_ACCESS_KEY]),
            session_token=SecretStr(token) if token else None,
        )

    @classmethod
    def from_secret_data(cls, data: Mapping[str, str] | None, secret_name: str) -> S3Credentials:
        """Credentials from a Kubernetes Secret's `data` (values base64-encoded, as the API returns them)."""
        data = data or {}
        missing = [k for k in (ACCESS_KEY_ID, SECRET_ACCESS_KEY) if not data.get(k)]
        if missing:
            raise S3AccessError(
                f"Secret '{secret_name}' lacks {', '.join(missing)}: create it with "
                f"`kubectl create secret generic {secret_name} --from-literal={ACCESS_KEY_ID}=... "
                f"--from-literal={SECRET_ACCESS_KEY}=...`",
                FailureReason.INVALID_CONFIG,
            )

        def decode(key: str) -> str:
            try:
                return base64.b64decode(data[key], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                # The value itself is never quoted: it is a secret.
                raise S3AccessError(f"Secret '{secret_name}': {key} is not valid base64 text",
                                    FailureReason.INVALID_CONFIG) from None

        token = decode(SESSION_TOKEN) if data.get(SESSION_TOKEN) else None
        return cls(
            access_key_id=decode(ACCESS_KEY_ID),
            secret_access_key=SecretStr(decode(SECRET_ACCESS_KEY)),
            session_token=SecretStr(token) if token else None,
        )

    def as_env(self) -> dict[str, str]:
        """The environment a child process (e.g. the one-machine runner's trainer) needs."""
        env = {ACCESS_KEY_ID: self.access_key_id, SECRET_ACCESS_KEY: self.secret_access_key.get_secret_value()}
        if self.session_token is not None:
            env[SESSION_TOKEN] = self.session_token.get_secret_value()
        return env


class S3AccessError(StorageError):
    """An S3 location cannot be used; the message says which one and what to do, and holds no secret.
    `reason` is permanent for a missing bucket and refused credentials, ERROR (worth a retry) otherwise."""


def use_budget(budget: RetryBudget) -> None:
    """Sets the retry budget of the clients this process makes from now on (called before any is made)."""
    global _budget
    _budget = budget
    with _CACHE_LOCK:
        _cached_client.cache_clear()


def client_config(budget: RetryBudget | None = None, **overrides: float) -> Config:
    """The config of `budget` (default: the process's), with fields of it overridden (tests fail fast)."""
    chosen = replace(budget or _budget, **overrides)
    return Config(
        # Path style works with every S3 server (SeaweedFS, MinIO, Ceph) and with dotted bucket names.
        s3={"addressing_style": "path"},
        # "adaptive" adds client-side rate limiting once the server throttles.
        retries={"mode": "adaptive", "total_max_attempts": chosen.max_attempts},
        connect_timeout=chosen.connect_timeout,
        read_timeout=chosen.read_timeout,
        max_pool_connections=MAX_POOL_CONNECTIONS,
    )


def make_client(
    endpoint: str | None = None,
    region: str | None = None,
    credentials: S3Credentials | None = None,
    *,
    config: Config | None = None,
) -> Any:
    """An S3 client. Without explicit credentials, boto3's chain (environment, IRSA, instance role) applies."""
    explicit: dict[str, str | None] = {}
    if credentials is not None:
        explicit = {
            "aws_access_key_id": credentials.access_key_id,
            "aws_secret_access_key": credentials.secret_access_key.get_secret_value(),
            "aws_session_token": (
                credentials.session_token.get_secret_value() if credentials.session_token else None
            ),
        }
    # The shared session when credentials are given (a client from it is quick to make; sessions are not
    # thread-safe); a session of its own otherwise, since a session resolves the credential chain once and keeps it.
    with _SESSION_LOCK:
        session = _session() if credentials is not None else _new_session()
        return session.client(
            "s3",
            endpoint_url=endpoint or os.environ.get(ENDPOINT_URL) or None,
            region_name=region or os.environ.get(REGION) or DEFAULT_REGION,
            config=config or client_config(),
            **explicit,
        )


def shared_client(endpoint: str | None, region: str | None, credentials: S3Credentials | None) -> Any:
    """One client per endpoint, region and credentials, reused across threads (boto3 clients are thread-safe),
    or per thread too when the process's budget says so.

    Building a client parses botocore's service model: about 0.1 s of CPU, which an operator reading
    progress.json of hundreds of jobs every few seconds cannot spend each time.
    """
    thread = threading.get_ident() if _budget.client_per_thread else None
    # One builder at a time: a burst of threads that all missed would each build the same client (seconds of CPU).
    with _CACHE_LOCK:
        return _cached_client(endpoint, region, credentials, thread)


class ThreadClient:
    """A client that is `shared_client(endpoint, region, credentials)` of whichever thread calls it.

    A store is built once but used by many threads (the trainer's reader workers and batch prefetcher); a
    client bound at construction would be the constructing thread's, and its threads would share one retry
    quota after all.
    """

    def __init__(self, endpoint: str | None, region: str | None, credentials: S3Credentials | None) -> None:
        self._key = (endpoint, region, credentials)
        self.endpoint, self.region, self.credentials = endpoint, region, credentials

    def __getattr__(self, name: str) -> Any:
        return getattr(shared_client(*self._key), name)


@functools.lru_cache(maxsize=256)
def _cached_client(
    endpoint: str | None, region: str | None, credentials: S3Credentials | None, thread: int | None
) -> Any:
    return make_client(endpoint, region, credentials)


@functools.cache
def _session() -> boto3.session.Session:
    """The session clients with explicit credentials are made from: it parses S3's service model once."""
    return _new_session()


def _new_session() -> boto3.session.Session:
    """A session whose responses keep timestamps as text: nothing here reads them, and parsing them with
    dateutil was about half of a listing's CPU (preflight listed 60,000 objects in 5.1 s instead of 9.9 s;
    bench/preflight_bench.py)."""
    core = botocore.session.get_session()
    core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return boto3.session.Session(botocore_session=core)


def endpoint_of(client: Any) -> str:
    return str(client.meta.endpoint_url)


_NO_BUCKET = {"NoSuchBucket"}
_DENIED = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden", "AccountProblem"}
_BAD_CREDENTIALS = {
    "SignatureDoesNotMatch",
    "InvalidAccessKeyId",
    "InvalidToken",
    "ExpiredToken",
    "AuthorizationHeaderMalformed",
    "InvalidClientTokenId",
}


def access_error(exc: Exception, *, what: str, bucket: str, endpoint: str, secret_name: str | None) -> S3AccessError:
    """Map a botocore failure to a message naming `what` (e.g. "dataset 'clips'") and the bucket.

    Only the error code and fixed text are used: botocore's own messages can echo request details.
    """
    where = f"{what}: bucket '{bucket}' at {endpoint}"
    creds = f"the credentials in Secret '{secret_name}'" if secret_name else "the AWS_* credentials of the environment"
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in _NO_BUCKET or code == "404":
            return S3AccessError(f"{where} does not exist: create it or fix the bucket name",
                                 FailureReason.NO_SUCH_BUCKET)
        if code == "NoSuchKey":
            return S3AccessError(f"{where} has no such object")
        if code in _BAD_CREDENTIALS:
            return S3AccessError(f"{where} rejected {creds} ({code}): fix the access key id or secret key",
                                 FailureReason.ACCESS_DENIED)
        if code in _DENIED:
            return S3AccessError(
                f"{where} denied access to {creds}: grant s3:ListBucket and s3:GetObject (s3:PutObject for output)",
                FailureReason.ACCESS_DENIED,
            )
        return S3AccessError(f"{where} failed with S3 error {code or 'unknown'}")
    if isinstance(exc, EndpointConnectionError):
        return S3AccessError(f"{where} cannot be reached: check the endpoint URL and that the server is up")
    if isinstance(exc, BotoCoreError):
        return S3AccessError(f"{where} failed: {type(exc).__name__}; check the endpoint URL and the network")
    raise TypeError(f"not an S3 error: {type(exc).__name__}") from exc
