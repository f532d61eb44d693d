"""The job's model source (spec.model.source) parsed, and the checkpoint files a spec needs beyond the layout.

Torch-free and without the Hub client, so that preflight (operator and trainer alike) can refuse a spec whose
checkpoint lacks a file before any GPU is asked for; the trainer's model/sources.py resolves the source.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .api import JobSpec, Location, S3Location
from .failures import InvalidConfigError
from .s3 import S3AccessError
from .storage import CredentialsLookup, env_credentials, store_for

# The official checkpoint's distillation LoRA (its image-to-video demo loads it for 16-step sampling).
CFG_STEP_LORA = "lora/cfg_step_lora.safetensors"


class ModelSourceError(InvalidConfigError):
    """A model source that cannot be resolved; the message names the source and what to fix."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["local", "hf", "s3"]
    location: str  # local path, hf repo id, or s3 bucket
    revision: str | None = None  # hf only
    prefix: str = ""  # s3 only

    @classmethod
    def parse(cls, source: str) -> ModelSource:
        if source.startswith("hf://"):
            repo, _, revision = source[len("hf://") :].partition("@")
            if repo.count("/") != 1 or not all(repo.split("/")):
                raise ModelSourceError(f"model source {source!r}: write hf://org/repo or hf://org/repo@revision")
            return cls("hf", repo, revision or None)
        if source.startswith("s3://"):
            bucket, _, prefix = source[len("s3://") :].partition("/")
            if not bucket:
                raise ModelSourceError(f"model source {source!r}: write s3://bucket/prefix")
            return cls("s3", bucket, prefix=prefix.strip("/"))
        if "://" in source:
            raise ModelSourceError(f"model source {source!r}: use a local path, hf://org/repo[@rev] or s3://bucket/prefix")
        return cls("local", source)


def required_files(spec: JobSpec) -> list[str]:
    """Checkpoint files (relative to its root) that the spec needs besides the five folders."""
    return [CFG_STEP_LORA] if spec.validation.sampler == "distilled" else []


def missing_file_problem(source: str, key: str) -> str:
    return (f"spec.validation.sampler distilled needs {key} in the checkpoint (spec.model.source {source}), which "
            f"has none; add the official checkpoint's {key} there, or use sampler standard")


def model_file_problems(spec: JobSpec, credentials: CredentialsLookup = env_credentials) -> list[str]:
    """One line per required file that the local or s3:// checkpoint lacks. A Hub source is checked by the
    trainer once it is fetched (the operator does not talk to the Hub)."""
    wanted = required_files(spec)
    source = ModelSource.parse(spec.model.source)
    if not wanted or source.kind == "hf":
        return []
    if source.kind == "local":
        return [missing_file_problem(spec.model.source, key) for key in wanted
                if not (Path(source.location) / key).is_file()]
    access = spec.model.storage.model_dump() if spec.model.storage is not None else {}
    location = Location(s3=S3Location(bucket=source.location, prefix=source.prefix, **access))
    store = store_for(location, what=f"model source {spec.model.source} (spec.model.source)", credentials=credentials)
    try:
        present = {record.key for record in store.list()}  # HEAD's 404 cannot tell a missing key from a bucket
    except S3AccessError as exc:
        return [f"spec.model.source: cannot list the checkpoint: {exc}"]
    return [missing_file_problem(spec.model.source, key) for key in wanted if key not in present]
