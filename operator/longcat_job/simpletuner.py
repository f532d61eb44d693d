"""Imports SimpleTuner's `config.json` and `multidatabackend.json` into a LongCatI2VJob document.

Each SimpleTuner setting maps to the spec field whose description names it. What has no place in the job is
reported, never silently dropped; inline credentials are never copied (they belong in a Secret).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import api

# config.json key -> path of the spec field (camelCase, as written in YAML).
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "model_family": ("model", "family"),
    "model_flavour": ("model", "flavour"),
    "model_type": ("model", "type"),
    "lora_rank": ("lora", "rank"),
    "lora_alpha": ("lora", "alpha"),
    "lora_dropout": ("lora", "dropout"),
    "train_batch_size": ("training", "batchSize"),
    "gradient_checkpointing": ("training", "gradientCheckpointing"),
    "learning_rate": ("training", "learningRate"),
    "lr_scheduler": ("training", "lrScheduler"),
    "lr_warmup_steps": ("training", "warmupSteps"),
    "max_train_steps": ("training", "maxSteps"),
    "gradient_accumulation_steps": ("training", "gradientAccumulation"),
    "max_grad_norm": ("training", "maxGradNorm"),
    "flow_schedule_shift": ("training", "flowShift"),
    "seed": ("training", "seed"),
    "mixed_precision": ("training", "precision"),
    "base_model_precision": ("training", "baseQuantization"),
    "checkpointing_steps": ("training", "checkpointEvery"),
    "checkpoints_total_limit": ("training", "keepCheckpoints"),
    "validation_resolution": ("validation", "resolution"),
    "validation_num_video_frames": ("validation", "frames"),
    "validation_num_inference_steps": ("validation", "numInferenceSteps"),
    "validation_guidance": ("validation", "guidance"),
    "validation_negative_prompt": ("validation", "negativePrompt"),
    "validation_using_datasets": ("validation", "usingDatasets"),
    "eval_dataset_id": ("validation", "evalDatasetId"),
    "validation_steps": ("validation", "everySteps"),
    "validation_seed": ("validation", "seed"),
    "aspect_bucket_alignment": ("aspectBucketAlignment",),
}
# Settings that only say where SimpleTuner finds things this job carries itself.
ABSORBED = {"data_backend_config", "output_dir", "pretrained_model_name_or_path"}
# SimpleTuner writes "no quantization" and "no lora_alpha" in these ways.
NO_QUANTIZATION = {None, "no_change", "none"}
DATASET_TYPES = {"video", "conditioning"}
CREDENTIAL_KEYS = {"aws_access_key_id", "aws_secret_access_key"}


@dataclass
class ImportResult:
    job: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _location(uri_or_path: str, s3: dict[str, Any] | None = None) -> dict[str, Any]:
    if uri_or_path.startswith("s3://"):
        bucket, _, prefix = uri_or_path[len("s3://"):].partition("/")
        return {"s3": {**(s3 or {}), "bucket": bucket, "prefix": prefix}}
    return {"local": {"path": uri_or_path}}


def _dataset(entry: dict[str, Any], notes: list[str]) -> dict[str, Any] | None:
    dataset_id = entry.get("id", "?")
    where = f"multidatabackend.json dataset {dataset_id!r}"
    if entry.get("disabled"):
        notes.append(f"{where}: disabled in SimpleTuner, left out")
        return None
    if entry.get("dataset_type") not in DATASET_TYPES:
        notes.append(f"{where}: dataset_type {entry.get('dataset_type')!r} has no equivalent (only video and "
                     "conditioning datasets; text embeddings are cached by the trainer itself), left out")
        return None
    out: dict[str, Any] = {"id": dataset_id, "type": entry["dataset_type"]}
    backend = entry.get("type", "local")
    if backend == "local":
        out["source"] = _location(entry.get("instance_data_dir", ""))
    elif backend == "aws":
        s3 = {key: entry[name] for key, name in (("endpoint", "aws_endpoint_url"), ("region", "aws_region_name"))
              if entry.get(name)}
        s3.update(bucket=entry.get("aws_bucket_name", ""), prefix=entry.get("aws_data_prefix", ""))
        out["source"] = {"s3": s3}
        if CREDENTIAL_KEYS & entry.keys():
            notes.append(f"{where}: inline AWS credentials were not copied: store them in a Secret with keys "
                         f"{api.SECRET_ACCESS_KEY_ID}/{api.SECRET_SECRET_ACCESS_KEY} and set "
                         "source.s3.credentialsSecret")
    else:
        notes.append(f"{where}: backend type {backend!r} is not supported (use local or aws)")
        out["source"] = {}
    if entry.get("is_i2v") is not None:
        out["isI2V"] = entry["is_i2v"]
    if entry.get("caption_strategy") is not None:
        out["captionStrategy"] = entry["caption_strategy"]
    if entry.get("resolution") is not None:
        out["resolution"] = entry["resolution"]
    frames = (entry.get("video") or {}).get("num_frames")
    if frames is not None:
        out["frames"] = frames
    conditioning = entry.get("conditioning_data")
    if conditioning:
        out["conditioningData"] = [conditioning] if isinstance(conditioning, str) else list(conditioning)
    if entry.get("cache_dir_vae"):
        out["vaeCache"] = _location(entry["cache_dir_vae"])
    known = {"id", "type", "dataset_type", "instance_data_dir", "is_i2v", "caption_strategy", "resolution", "video",
             "conditioning_data", "cache_dir_vae", "aws_bucket_name", "aws_data_prefix", "aws_endpoint_url",
             "aws_region_name", "disabled"} | CREDENTIAL_KEYS
    for key in sorted(entry.keys() - known):
        notes.append(f"{where}: setting {key!r} has no equivalent, left out")
    return out


def import_simpletuner(
    config: dict[str, Any], backends: list[dict[str, Any]], name: str, output: str | None = None
) -> ImportResult:
    """Builds the job document; `output` (s3://... or a path) overrides config.json's output_dir."""
    notes: list[str] = []
    spec: dict[str, Any] = {}
    for key, value in config.items():
        if key in CONFIG_FIELDS:
            if key == "base_model_precision" and value in NO_QUANTIZATION:
                continue
            if key == "lora_alpha" and value is None:
                continue
            _set(spec, CONFIG_FIELDS[key], value)
        elif key not in ABSORBED:
            notes.append(f"config.json: setting {key!r} has no equivalent, left out")
    source = config.get("pretrained_model_name_or_path")
    if source:
        _set(spec, ("model", "source"), source if "://" in source or source.startswith("/") else f"hf://{source}")

    spec["datasets"] = [d for d in (_dataset(entry, notes) for entry in backends) if d is not None]
    declared = {d["id"] for d in spec["datasets"]}
    eval_id = spec.get("validation", {}).get("evalDatasetId")
    if eval_id is not None and eval_id not in declared:
        notes.append(f"config.json: eval_dataset_id {eval_id!r} is not declared in multidatabackend.json: add that "
                     "validation split (a video dataset with is_i2v and its conditioning dataset)")

    output_dir = output or config.get("output_dir")
    if output_dir:
        spec["output"] = _location(output_dir)
    else:
        notes.append("config.json: output_dir is not set: pass --output s3://BUCKET/PREFIX (or a directory)")
    job = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name}, "spec": spec}
    return ImportResult(job=job, notes=notes)
