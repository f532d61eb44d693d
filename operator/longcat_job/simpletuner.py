"""Imports SimpleTuner's `config.json` and `multidatabackend.json` into a LongCatI2VJob document.

Each SimpleTuner setting maps to the spec field whose description names it. What has no place in the job is
reported, never silently dropped; inline credentials are never copied (they belong in a Secret). Caption
dropout, init_lora, the EMA settings, group offloading and length bucketing (video.bucket_strategy
resolution_frames) map to captionDropout, lora.initFrom, training.ema, training.offload and frameBuckets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import api, lora_files

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
# Settings that only say where SimpleTuner finds things this job carries itself, or that `_features` maps.
ABSORBED = {"data_backend_config", "output_dir", "pretrained_model_name_or_path"}
FEATURE_KEYS = {"caption_dropout_probability", "init_lora", "use_ema", "ema_decay", "ema_update_interval",
                "ema_device", "ema_cpu_only", "enable_group_offload", "group_offload_use_stream"}
MAX_FRAME_BUCKETS = 16  # api.DatasetSpec.frame_buckets' limit
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
    video = entry.get("video") or {}
    if video.get("num_frames") is not None:
        out["frames"] = video["num_frames"]
    _frame_buckets(video, out, where, notes)
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


def _frame_buckets(video: dict[str, Any], out: dict[str, Any], where: str, notes: list[str]) -> None:
    """SimpleTuner's `bucket_strategy: resolution_frames` buckets clips by length, every `frame_interval` frames
    between min_frames and max_frames: here the counts of that range the VAE takes ((n - 1) % 4 == 0)."""
    strategy = video.get("bucket_strategy", "aspect_ratio")
    ranged = [key for key in ("min_frames", "max_frames", "frame_interval") if video.get(key) is not None]
    for key in sorted(video.keys() - {"num_frames", "bucket_strategy", "min_frames", "max_frames", "frame_interval"}):
        notes.append(f"{where}: setting 'video.{key}' has no equivalent, left out")
    if strategy != "resolution_frames":
        if strategy != "aspect_ratio":
            notes.append(f"{where}: video.bucket_strategy {strategy!r} has no equivalent, left out")
        for key in ranged:
            notes.append(f"{where}: video.{key} only matters with bucket_strategy resolution_frames here; left out "
                         "(a clip shorter than `frames` is skipped)")
        return
    longest = video.get("max_frames") or video.get("num_frames") or api.DatasetSpec.model_fields["frames"].default
    shortest = max(5, video.get("min_frames") or 5)
    interval = max(1, video.get("frame_interval") or 4)
    # Every interval-th count down from the longest, each rounded down to one the VAE takes.
    snapped = {(n - 1) // 4 * 4 + 1 for n in range(longest, shortest - 1, -interval)}
    counts = sorted(n for n in snapped if n >= shortest)[-MAX_FRAME_BUCKETS:]
    if counts:
        out["frameBuckets"] = counts
        notes.append(f"{where}: video.bucket_strategy resolution_frames became frameBuckets {counts} (every "
                     "frame_interval frames from max_frames down to min_frames, rounded down to (n - 1) % 4 == 0): "
                     "check them")
    else:
        notes.append(f"{where}: video.bucket_strategy resolution_frames gives no frame count with (n - 1) % 4 "
                     f"== 0 between {shortest} and {longest}: set frameBuckets by hand")


def _features(config: dict[str, Any], spec: dict[str, Any], notes: list[str]) -> None:
    """Caption dropout, the LoRA to start from and the EMA (after the datasets: dropout is set on each)."""
    dropout = config.get("caption_dropout_probability")
    if dropout:
        for dataset in spec["datasets"]:
            if dataset["type"] == "video":
                dataset.setdefault("captionDropout", dropout)
    init = config.get("init_lora")
    if init:
        folder, _, name = init.rpartition("/") if init.endswith(".safetensors") else (init.rstrip("/"), "", "")
        spec.setdefault("lora", {})["initFrom"] = _location(folder or ".")
        if name and name not in (lora_files.PEFT_WEIGHTS, lora_files.OFFICIAL_WEIGHTS):
            notes.append(f"config.json: init_lora {init!r}: lora.initFrom reads {lora_files.PEFT_WEIGHTS} or "
                         f"{lora_files.OFFICIAL_WEIGHTS} in {folder!r}: rename the file to one of them")
    if config.get("use_ema"):
        ema: dict[str, Any] = {}
        for key, name in (("ema_decay", "decay"), ("ema_update_interval", "everySteps")):
            if config.get(key) is not None:
                ema[name] = config[key]
        if config.get("ema_cpu_only") or config.get("ema_device") == "cpu":
            ema["device"] = "cpu"
        spec.setdefault("training", {})["ema"] = ema
    if config.get("enable_group_offload"):
        # Ours always streams block by block on a side stream: group_offload_use_stream has nothing to choose.
        spec.setdefault("training", {})["offload"] = "blocks"


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
        elif key not in ABSORBED | FEATURE_KEYS:
            notes.append(f"config.json: setting {key!r} has no equivalent, left out")
    source = config.get("pretrained_model_name_or_path")
    if source:
        _set(spec, ("model", "source"), source if "://" in source or source.startswith("/") else f"hf://{source}")

    spec["datasets"] = [d for d in (_dataset(entry, notes) for entry in backends) if d is not None]
    _features(config, spec, notes)
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
