"""The one S3 client configuration used by the operator, the trainer and the CLI.

Credentials come either from the job's Secret (read by the operator and passed in explicitly) or from the
environment (the trainer's pods get the Secret as AWS_* variables). Errors of access are turned into
messages that name what was being read (a dataset, the output) and the bucket, and never carry a secret.
"""

from __future__ import annotations

import base64
import functools
import binascii
import os
from collections.abc import Mapping
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError
from pydantic import BaseModel, ConfigDict, SecretStr

DEFAULT_REGION = "us-east-1"
# Total attempts per request, the first included; "adaptive" adds client-side rate limiting on throttling.
MAX_ATTEMPTS = 5
CONNECT_TIMEOUT_S = 5.0
# Per socket read, not per object: a slow multi-GB GET is fine as long as bytes keep coming.
READ_TIMEOUT_S = 60.0
# Enough connections for the preflight's concurrent listings and the reader's parallel downloads.
MAX_POOL_CONNECTIONS = 32

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
                f"--from-literal={SECRET_ACCESS_KEY}=...`"
            )

        def decode(key: str) -> str:
            try:
                return base64.b64decode(data[key], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                # The value itself is never quoted: it is a secret.
                raise S3AccessError(f"Secret '{secret_name}': {key} is not valid base64 text") from None

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


class S3AccessError(Exception):
    """An S3 location cannot be used; the message says which one and what to do, and holds no secret."""


def client_config(
    *,
    max_attempts: int = MAX_ATTEMPTS,
    connect_timeout: float = CONNECT_TIMEOUT_S,
    read_timeout: float = READ_TIMEOUT_S,
) -> Config:
    return Config(
        # Path style works with every S3 server (SeaweedFS, MinIO, Ceph) and with dotted bucket names.
        s3={"addressing_style": "path"},
        retries={"mode": "adaptive", "total_max_attempts": max_attempts},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
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
    session = boto3.session.Session()
    explicit: dict[str, str | None] = {}
    if credentials is not None:
        explicit = {
            "aws_access_key_id": credentials.access_key_id,
            "aws_secret_access_key": credentials.secret_access_key.get_secret_value(),
            "aws_session_token": (
                credentials.session_token.get_secret_value() if credentials.session_token else None
            ),
        }
    return session.client(
        "s3",
        endpoint_url=endpoint or os.environ.get(ENDPOINT_URL) or None,
        region_name=region or os.environ.get(REGION) or DEFAULT_REGION,
        config=config or client_config(),
        **explicit,
    )


@functools.lru_cache(maxsize=64)
def shared_client(endpoint: str | None, region: str | None, credentials: S3Credentials | None) -> Any:
    """One client per endpoint, region and credentials, reused across threads (boto3 clients are thread-safe).

    Building a client parses botocore's service model: about 0.1 s of CPU, which an operator reading
    progress.json of hundreds of jobs every few seconds cannot spend each time.
    """
    return make_client(endpoint, region, credentials)


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
            return S3AccessError(f"{where} does not exist: create it or fix the bucket name")
        if code == "NoSuchKey":
            return S3AccessError(f"{where} has no such object")
        if code in _BAD_CREDENTIALS:
            return S3AccessError(f"{where} rejected {creds} ({code}): fix the access key id or secret key")
        if code in _DENIED:
            return S3AccessError(
                f"{where} denied access to {creds}: grant s3:ListBucket and s3:GetObject (s3:PutObject for output)"
            )
        return S3AccessError(f"{where} failed with S3 error {code or 'unknown'}")
    if isinstance(exc, EndpointConnectionError):
        return S3AccessError(f"{where} cannot be reached: check the endpoint URL and that the server is up")
    if isinstance(exc, BotoCoreError):
        return S3AccessError(f"{where} failed: {type(exc).__name__}; check the endpoint URL and the network")
    raise TypeError(f"not an S3 error: {type(exc).__name__}") from exc
