"""The operator's own settings, from its environment (the Helm chart's values set them)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from pydantic import BaseModel, Field

ENV_PREFIX = "LONGCAT_"


class OperatorSettings(BaseModel):
    trainer_image: str = Field("ghcr.io/longcat-i2v/trainer:0.1.0", description="Used when a job names no image.")
    default_s3_endpoint: str | None = Field(None, description="Used for S3 locations that name no endpoint.")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of one GPU.")
    metrics_port: int = Field(9090, description="Port of each trainer pod's Prometheus endpoint.")
    rendezvous_port: int = Field(29500, description="torchrun's port on pod 0 of the gang.")
    progress_interval_s: float = Field(15.0, gt=0, description="How often running jobs' progress.json is read.")
    peering_lifetime_s: int = Field(
        60, gt=0, description="How long a silent replica keeps the lead before a standby takes over."
    )

    allowed_s3_endpoints: str = Field(
        "", description="Comma-separated S3 endpoint URLs that jobs may name besides the default endpoint and AWS's "
        "own (https://s3.<region>.amazonaws.com); '*' allows any. Link-local and cloud metadata addresses are "
        "refused whatever this says.",
    )

    webhook_port: int | None = Field(None, description="Serve the validating webhook on this port (TLS).")
    webhook_cert_dir: str = Field("/etc/longcat/webhook", description="Holds the webhook's tls.crt and tls.key.")

    @property
    def allowed_endpoints(self) -> frozenset[str]:
        return frozenset(e.strip().rstrip("/") for e in self.allowed_s3_endpoints.split(",") if e.strip())

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorSettings:
        env = os.environ if env is None else env
        values = {
            name: env[key]
            for name in cls.model_fields
            if (key := ENV_PREFIX + name.upper()) in env and env[key] != ""
        }
        return cls.model_validate(values)
