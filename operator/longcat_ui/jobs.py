"""The jobs a server shows: those of its output location (one job, or a folder of jobs) and, where it may
list them, the cluster's LongCatI2VJobs; what each one's output holds."""

from __future__ import annotations

import json
import logging
import re
from pathlib import PurePosixPath
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from longcat_job import output_layout
from longcat_job.api import GROUP, PLURAL, VERSION, Location, LongCatI2VJob, ValidationSpec
from longcat_job.loss_history import LossHistory
from longcat_job.lora_files import PEFT_WEIGHTS
from longcat_job.progress import TrainerProgress
from longcat_job.s3 import S3AccessError
from longcat_job.storage import ObjectStore, store_for

from .locations import children, under

log = logging.getLogger(__name__)

_CHECKPOINT = re.compile(r"^checkpoints/step-(\d+)/")


@dataclass
class Job:
    id: str  # in URLs: the job's folder name (the location's own for one job), or namespace:name
    store: ObjectStore
    cluster_status: dict[str, Any] | None = None  # the LongCatI2VJob's status, where the server lists them

    def read(self, key: str) -> bytes | None:
        try:
            return self.store.get_bytes(key)
        except (FileNotFoundError, S3AccessError):
            return None

    def progress(self) -> TrainerProgress | None:
        data = self.read(output_layout.PROGRESS)
        return TrainerProgress.from_json(data) if data else None

    def spec(self) -> LongCatI2VJob | None:
        """The job as its trainer ran it (job.json); None for outputs of older trainers."""
        data = self.read(output_layout.JOB)
        try:
            return LongCatI2VJob.model_validate_json(data, strict=False) if data else None
        except ValidationError as exc:
            log.warning("%s/%s is not a job (%d errors): ignored", self.store.url, output_layout.JOB,
                        exc.error_count())
            return None

    def validation(self) -> ValidationSpec:
        job = self.spec()
        return job.spec.validation if job else ValidationSpec()

    def loss(self) -> LossHistory:
        data = self.read(output_layout.LOSS_HISTORY)
        return LossHistory.model_validate_json(data) if data else LossHistory()

    def validation_entries(self) -> list[dict]:
        data = self.read(output_layout.VALIDATION_INDEX)
        return json.loads(data) if data else []

    def loras(self) -> dict[str, list[str]]:
        """Folder -> its files, for the final LoRA (lora/) and each checkpoint (checkpoints/step-N/), each
        holding the peft weights the preview loads; newest checkpoint first."""
        folders: dict[str, list[str]] = {}
        for prefix in (output_layout.LORA, output_layout.CHECKPOINTS):
            try:
                records = list(under(self.store, prefix.rstrip("/")).list())
            except (FileNotFoundError, S3AccessError):
                continue
            for record in records:
                key = prefix + record.key
                folder = key[: key.rindex("/") + 1]
                if folder.startswith(output_layout.CHECKPOINTS) and not _CHECKPOINT.match(key):
                    continue  # checkpoints/latest
                folders.setdefault(folder, []).append(key)
        with_weights = {f: sorted(keys) for f, keys in folders.items() if f + PEFT_WEIGHTS in keys}
        return dict(sorted(with_weights.items(), key=lambda item: (item[0] != output_layout.LORA, -_step(item[0]))))

    def start_frames(self) -> list[dict]:
        """The validation samples' start frames (copied beside the videos): key, name, prompt."""
        seen: dict[int, dict] = {}
        for entry in self.validation_entries():
            for f in entry["files"]:
                if f.get("start"):
                    seen.setdefault(f["index"], {"key": f["start"], "name": f["name"], "prompt": f["prompt"]})
        return [seen[i] for i in sorted(seen)]


def _step(folder: str) -> int:
    match = _CHECKPOINT.match(folder)
    return int(match.group(1)) if match else 0


def _location_as_job(store: ObjectStore) -> Job | None:
    """The location itself, named by its last folder, when it holds one job's progress.json."""
    itself = Job(PurePosixPath(store.url.rstrip("/")).name or "job", store)
    return itself if itself.read(output_layout.PROGRESS) is not None else None


def jobs_of_location(store: ObjectStore) -> list[Job]:
    """One job when the location holds progress.json itself, else each sub-folder that holds one."""
    if (itself := _location_as_job(store)) is not None:
        return [itself]
    found = []
    for name in children(store):
        job = Job(name, under(store, name))
        if job.read(output_layout.PROGRESS) is not None:
            found.append(job)
    return found


def job_of_location(store: ObjectStore, job_id: str) -> Job | None:
    """The job `job_id` of `jobs_of_location` without reading every job's progress.json (a video's range
    requests each look their job up)."""
    if (itself := _location_as_job(store)) is not None:
        return itself if itself.id == job_id else None
    if "/" in job_id or job_id in ("", ".", ".."):
        return None
    job = Job(job_id, under(store, job_id))
    return job if job.read(output_layout.PROGRESS) is not None else None


def _cluster_job(item: dict[str, Any]) -> Job | None:
    meta = item.get("metadata", {})
    try:
        location = Location.model_validate(item["spec"]["output"], strict=False)
    except (KeyError, ValidationError):
        return None
    store = store_for(location, what=f"LongCatI2VJob {meta.get('namespace')}/{meta.get('name')}: spec.output")
    return Job(f"{meta.get('namespace')}:{meta.get('name')}", store, item.get("status") or {})


def cluster_job(custom_objects: Any, job_id: str) -> Job | None:
    from kubernetes.client.exceptions import ApiException  # noqa: PLC0415 - only where there is a cluster

    namespace, _, name = job_id.partition(":")
    try:
        return _cluster_job(custom_objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name))
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def cluster_jobs(custom_objects: Any) -> list[Job]:
    """Every LongCatI2VJob the server's ServiceAccount may list, read through its spec.output with the
    server's own S3 credentials (the environment's: the Secret the jobs use)."""
    items = custom_objects.list_cluster_custom_object(GROUP, VERSION, PLURAL).get("items", [])
    return [job for job in map(_cluster_job, items) if job is not None]
