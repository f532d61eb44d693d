"""The seed's SimpleTuner files go through the importer: settings land in their fields, gaps are reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longcat_job.parse import InvalidJob, parse_job
from longcat_job.simpletuner import import_simpletuner
from tests.invalid_jobs import ROOT

SEED = ROOT / "tests" / "data" / "simpletuner"
CONFIG = json.loads((SEED / "config.json").read_text())
BACKENDS = json.loads((SEED / "multidatabackend.json").read_text())
VAL_SPLIT = [
    {"id": "longcat-video-val", "type": "local", "dataset_type": "video", "is_i2v": True,
     "instance_data_dir": "/data/val-clips", "caption_strategy": "textfile", "resolution": 480,
     "conditioning_data": "longcat-video-val-cond"},
    {"id": "longcat-video-val-cond", "type": "local", "dataset_type": "conditioning",
     "instance_data_dir": "/data/val-start-frames", "caption_strategy": None, "resolution": 480},
]


def test_seed_as_is_reports_the_undeclared_validation_split():
    result = import_simpletuner(CONFIG, BACKENDS, name="seed", output="s3://my-loras/seed/")
    assert any("'longcat-video-val' is not declared" in note for note in result.notes), result.notes
    with pytest.raises(InvalidJob) as refused:
        parse_job(result.job)
    assert [e.path for e in refused.value.errors] == ["spec.validation.evalDatasetId"]


def test_seed_with_validation_split_is_a_valid_job():
    result = import_simpletuner(CONFIG, BACKENDS + VAL_SPLIT, name="seed", output="s3://my-loras/seed/")
    assert result.notes == []
    spec = parse_job(result.job).spec
    assert (spec.model.family, spec.model.flavour, spec.lora.rank) == ("longcat_video", "final", 8)
    assert (spec.training.batch_size, spec.training.learning_rate, spec.training.gradient_checkpointing) == (1, 1e-4, True)
    v = spec.validation
    assert (v.resolution, v.frames, v.num_inference_steps, v.guidance) == ("480x832", 93, 40, 4.0)
    assert v.using_datasets and v.eval_dataset_id == "longcat-video-val"
    train = spec.dataset("longcat-video-train")
    assert train.is_i2v and train.caption_strategy == "textfile" and train.resolution == 480
    assert train.source.local.path == "/data/video-clips"
    assert train.vae_cache.local.path == "/cache/vae/longcat/video"
    assert train.conditioning_data == ["longcat-video-cond"]
    cond = spec.dataset("longcat-video-cond")
    assert cond.type == "conditioning" and cond.caption_strategy is None
    assert spec.dataset("longcat-video-val").conditioning_data == ["longcat-video-val-cond"]
    assert spec.output.s3.bucket == "my-loras" and spec.output.s3.prefix == "seed/"


def test_unmappable_settings_are_named_and_credentials_never_copied():
    config = {**CONFIG, "eval_dataset_id": None, "use_fsdp": True, "base_model_precision": "int8-quanto"}
    aws = {"id": "remote", "type": "aws", "dataset_type": "video", "aws_bucket_name": "clips",
           "aws_data_prefix": "v/", "aws_endpoint_url": "http://127.0.0.1:9000",
           "aws_access_key_id": "AKIAEXAMPLEKEY", "aws_secret_access_key": "very-secret-value", "crop": True}
    text = {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds"}
    result = import_simpletuner(config, [*BACKENDS, aws, text], name="x", output="/out")
    notes = "\n".join(result.notes)
    assert "'use_fsdp' has no equivalent" in notes
    assert "'crop' has no equivalent" in notes
    assert "dataset 'text-embeds'" in notes
    assert "inline AWS credentials were not copied" in notes
    dumped = json.dumps(result.job)
    assert "very-secret-value" not in dumped and "AKIAEXAMPLEKEY" not in dumped
    job = parse_job(result.job).spec
    assert job.training.base_quantization == "int8-quanto"
    assert job.dataset("remote").source.s3.endpoint == "http://127.0.0.1:9000"


def test_cli_writes_a_job_file_that_validates(tmp_path: Path):
    backend = tmp_path / "multidatabackend.json"
    backend.write_text(json.dumps(BACKENDS + VAL_SPLIT))
    out = tmp_path / "job.yaml"
    cmd = [sys.executable, "-m", "longcat_operator.cli", "import-simpletuner", "--config", str(SEED / "config.json"),
           "--backend", str(backend), "--name", "seed", "--output", "s3://my-loras/seed/", "-o", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert yaml.safe_load(out.read_text())["metadata"]["name"] == "seed"
    validated = subprocess.run([sys.executable, "-m", "longcat_operator.cli", "validate", str(out)],
                               capture_output=True, text=True)
    assert validated.returncode == 0, validated.stderr


def test_cli_exits_1_and_names_the_missing_split():
    cmd = [sys.executable, "-m", "longcat_operator.cli", "import-simpletuner", "--config", str(SEED / "config.json"),
           "--backend", str(SEED / "multidatabackend.json"), "--output", "s3://my-loras/seed/"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 1
    assert "not mapped: config.json: eval_dataset_id 'longcat-video-val' is not declared" in result.stderr
    assert "invalid: spec.validation.evalDatasetId" in result.stderr


def test_dropout_init_lora_ema_and_length_buckets_map_to_their_fields():
    config = {**CONFIG, "caption_dropout_probability": 0.1, "init_lora": "/loras/previous/pytorch_lora_weights.safetensors",
              "use_ema": True, "ema_decay": 0.995, "ema_update_interval": 5, "ema_device": "cpu"}
    backends = json.loads(json.dumps(BACKENDS + VAL_SPLIT))
    backends[0]["video"] = {"num_frames": 93, "min_frames": 33, "max_frames": 93, "bucket_strategy": "resolution_frames",
                            "frame_interval": 30}
    result = import_simpletuner(config, backends, name="seed", output="s3://my-loras/seed/")
    spec = parse_job(result.job).spec
    train = spec.dataset("longcat-video-train")
    assert train.caption_dropout == 0.1 and spec.dataset("longcat-video-val").caption_dropout == 0.1
    assert train.frame_counts() == (33, 61, 93)  # 93, 63 -> 61, 33
    assert spec.lora.init_from.local.path == "/loras/previous"
    ema = spec.training.ema
    assert (ema.decay, ema.every_steps, ema.device) == (0.995, 5, "cpu")
    assert [n for n in result.notes if "frameBuckets [33, 61, 93]" not in n] == []


def test_group_offload_maps_to_block_offload_and_its_grouping_is_named():
    config = {**CONFIG, "enable_group_offload": True, "group_offload_use_stream": True,
              "group_offload_type": "leaf_level"}
    result = import_simpletuner(config, BACKENDS + VAL_SPLIT, name="seed", output="s3://my-loras/seed/")
    assert parse_job(result.job).spec.training.offload == "blocks"
    assert result.notes == ["config.json: setting 'group_offload_type' has no equivalent, left out"]
    off = import_simpletuner({**CONFIG, "enable_group_offload": False}, BACKENDS + VAL_SPLIT, name="seed",
                             output="s3://my-loras/seed/")
    assert parse_job(off.job).spec.training.offload == "none" and off.notes == []


def test_what_does_not_map_is_named():
    config = {**CONFIG, "init_lora": "/loras/mine.safetensors", "use_ema": False, "ema_decay": 0.9}
    backends = json.loads(json.dumps(BACKENDS + VAL_SPLIT))
    backends[0]["video"] = {"num_frames": 93, "min_frames": 33, "bucket_strategy": "aspect_ratio", "max_frames": 121}
    result = import_simpletuner(config, backends, name="seed", output="s3://my-loras/seed/")
    notes = "\n".join(result.notes)
    assert "init_lora '/loras/mine.safetensors': lora.initFrom reads pytorch_lora_weights.safetensors" in notes
    assert "video.min_frames only matters with bucket_strategy resolution_frames" in notes
    assert "video.max_frames only matters" in notes
    spec = parse_job(result.job).spec
    assert spec.training.ema is None and spec.dataset("longcat-video-train").frame_buckets is None
