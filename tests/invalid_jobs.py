"""The catalogue of malformed jobs, shared by the offline tests (pydantic) and the API-server tests (CRD).

Each case edits a copy of examples/minimal.yaml. `path` and `text` are what `longcat-i2v validate` must print;
`api_path` and `api_text` what the API server must answer (it names the field that carries a CEL rule, where the
offline check can point at the exact entry). `api_text=None` means the API server's own schema wording.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = yaml.safe_load((ROOT / "examples" / "minimal.yaml").read_text())


@dataclass(frozen=True)
class Case:
    name: str
    edit: Callable[[dict[str, Any]], None]
    path: str
    text: str
    api_path: str | None = None  # default: path
    api_text: str | None = "same"  # "same": text; None: the schema's generic wording

    def document(self) -> dict[str, Any]:
        doc = copy.deepcopy(MINIMAL)
        self.edit(doc)
        return doc

    @property
    def expected_api_path(self) -> str:
        return self.api_path or self.path

    @property
    def expected_api_text(self) -> str | None:
        return self.text if self.api_text == "same" else self.api_text


def spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]


def clips(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["datasets"][0]


def frames_dataset(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["datasets"][1]


def setting(*path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        node = doc["spec"]
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value

    return edit


def _val_split(doc: dict[str, Any], val_type: str = "video") -> None:
    spec(doc)["validation"] = {"evalDatasetId": "val"}
    val = {"id": "val", "type": val_type, "source": {"s3": {"bucket": "my-videos", "prefix": "val/"}}}
    spec(doc)["datasets"].append(val)


def _only_validation_video(doc: dict[str, Any]) -> None:
    spec(doc)["validation"] = {"evalDatasetId": "clips"}


def _many_datasets(doc: dict[str, Any]) -> None:
    base = frames_dataset(doc)
    spec(doc)["datasets"] += [{**copy.deepcopy(base), "id": f"frames-{i}"} for i in range(10_000)]


CASES: list[Case] = [
    Case("frames-92", lambda d: clips(d).update(frames=92), "spec.datasets[0].frames", "(frames - 1) % 4 == 0"),
    Case("frames-0", lambda d: clips(d).update(frames=0), "spec.datasets[0].frames",
         "greater than or equal to 5", api_text="greater than or equal to 5"),
    Case("frame-bucket-92", lambda d: clips(d).update(frameBuckets=[33, 92]), "spec.datasets[0].frameBuckets[1]",
         "(frames - 1) % 4 == 0"),
    Case("caption-dropout-2", lambda d: clips(d).update(captionDropout=2.0), "spec.datasets[0].captionDropout",
         "less than or equal to 1", api_text=None),
    Case("validation-frames-94", setting("validation", "frames", value=94), "spec.validation.frames",
         "(frames - 1) % 4 == 0"),
    Case("resolution-480x830", setting("validation", "resolution", value="480x830"), "spec.validation.resolution",
         "both sides positive multiples of 16"),
    Case("resolution-480x832x3", setting("validation", "resolution", value="480x832x3"),
         "spec.validation.resolution", "HEIGHTxWIDTH"),
    Case("resolution-0x832", setting("validation", "resolution", value="0x832"), "spec.validation.resolution",
         "positive multiples of 16"),
    Case("dataset-resolution-470", lambda d: clips(d).update(resolution=470), "spec.datasets[0].resolution",
         "multiple of 16"),
    Case("alignment-40", setting("aspectBucketAlignment", value=40), "spec.aspectBucketAlignment",
         "positive multiple of 16"),
    Case("duplicate-ids", lambda d: frames_dataset(d).update(id="clips"), "spec.datasets[1].id",
         "dataset ids must be unique", api_path="spec.datasets"),
    Case("unknown-conditioning", lambda d: clips(d).update(conditioningData=["first-frames"]),
         "spec.datasets[0].conditioningData[0]", "does not declare", api_path="spec.datasets"),
    Case("conditioning-is-video", lambda d: clips(d).update(conditioningData=["clips"]),
         "spec.datasets[0].conditioningData[0]", "dataset of type conditioning", api_path="spec.datasets"),
    Case("eval-id-missing", setting("validation", "evalDatasetId", value="longcat-video-val"),
         "spec.validation.evalDatasetId", "evalDatasetId must name a video dataset"),
    Case("eval-id-conditioning", lambda d: _val_split(d, "conditioning"), "spec.validation.evalDatasetId",
         "evalDatasetId must name a video dataset"),
    Case("no-training-video", _only_validation_video, "spec.datasets", "at least one video dataset"),
    Case("i2v-without-conditioning", lambda d: clips(d).pop("conditioningData"),
         "spec.datasets[0].conditioningData", "isI2V: true needs conditioningData"),
    Case("conditioning-with-captions", lambda d: frames_dataset(d).update(captionStrategy="textfile"),
         "spec.datasets[1].captionStrategy", "remove captionStrategy"),
    Case("conditioning-with-conditioning", lambda d: frames_dataset(d).update(conditioningData=["clips"]),
         "spec.datasets[1].conditioningData", "only video datasets take conditioningData"),
    Case("dataset-type-image", lambda d: clips(d).update(type="image"), "spec.datasets[0].type",
         "'video' or 'conditioning'", api_text='supported values: "video", "conditioning"'),
    Case("bad-dataset-id", lambda d: clips(d).update(id="Clips Ünïcode"), "spec.datasets[0].id",
         "dataset id must be 1 to 63 lowercase"),
    Case("context-parallel-3", setting("training", "contextParallel", value=3), "spec.training.contextParallel",
         "must divide the model's 32 attention heads"),
    Case("context-parallel-over-pod", setting("training", "contextParallel", value=2),
         "spec.training.contextParallel", "gpusPerNode must be a multiple of training.contextParallel"),
    Case("context-parallel-frames-81", lambda d: (clips(d).update(frames=81), setting("training", "contextParallel",
         value=2)(d), setting("resources", "gpusPerNode", value=2)(d)), "spec.datasets[0].frames",
         "latent frames ((frames - 1) / 4 + 1) of every video dataset", api_path="spec.datasets"),
    Case("context-parallel-validation-frames-5", lambda d: (setting("validation", "frames", value=5)(d),
         setting("training", "contextParallel", value=2)(d), setting("resources", "gpusPerNode", value=2)(d)),
         "spec.validation.frames", "two at least on each GPU"),
    Case("offload-with-fsdp", lambda d: (setting("training", "offload", value="blocks")(d),
         setting("training", "parallelism", value="fsdp")(d)), "spec.training.offload",
         "parallelism: fsdp shards them"),
    Case("offload-with-quantization", lambda d: (setting("training", "offload", value="blocks")(d),
         setting("training", "baseQuantization", value="int8-quanto")(d)), "spec.training.offload",
         "cannot be combined with baseQuantization"),
    Case("offload-layers", setting("training", "offload", value="layers"), "spec.training.offload",
         "'none' or 'blocks'", api_text='supported values: "none", "blocks"'),
    Case("rank-0", setting("lora", "rank", value=0), "spec.lora.rank", "greater than or equal to 1", api_text=None),
    Case("rank-huge", setting("lora", "rank", value=10**9), "spec.lora.rank", "rank must be at most 1024 (the DiT"),
    Case("dropout-1", setting("lora", "dropout", value=1.0), "spec.lora.dropout", "less than 1", api_text=None),
    Case("ema-decay-1", setting("training", "ema", value={"decay": 1.0}), "spec.training.ema.decay", "less than 1",
         api_text=None),
    Case("ema-device-tpu", setting("training", "ema", value={"device": "tpu"}), "spec.training.ema.device",
         "'gpu' or 'cpu'", api_text='supported values: "gpu", "cpu"'),
    Case("negative-learning-rate", setting("training", "learningRate", value=-1e-4), "spec.training.learningRate",
         "greater than 0", api_text=None),
    Case("learning-rate-string", setting("training", "learningRate", value="fast"), "spec.training.learningRate",
         "valid number", api_text=None),
    Case("frames-string", lambda d: clips(d).update(frames="93"), "spec.datasets[0].frames", "valid integer",
         api_text=None),
    Case("negative-guidance", setting("validation", "guidance", value=-4.0), "spec.validation.guidance",
         "greater than or equal to 1", api_text=None),
    Case("zero-inference-steps", setting("validation", "numInferenceSteps", value=0),
         "spec.validation.numInferenceSteps", "greater than or equal to 1", api_text=None),
    Case("nodes-0", setting("resources", "nodes", value=0), "spec.resources.nodes", "greater than or equal to 1",
         api_text=None),
    Case("gpus-per-node-0", setting("resources", "gpusPerNode", value=0), "spec.resources.gpusPerNode",
         "greater than or equal to 1", api_text=None),
    Case("negative-max-restarts", setting("maxRestarts", value=-1), "spec.maxRestarts",
         "greater than or equal to 0", api_text=None),
    Case("bad-shm-size", setting("resources", "shmSize", value="lots"), "spec.resources.shmSize",
         "should match pattern", api_text=None),
    Case("bad-toleration", setting("resources", "tolerations", value=[{"key": "gpu", "operator": "Maybe"}]),
         "spec.resources.tolerations[0].operator", "'Exists' or 'Equal'", api_text='supported values: "Exists"'),
    Case("unknown-model-family", setting("model", "family", value="wan"), "spec.model.family",
         "'longcat_video'", api_text='supported values: "longcat_video"'),
    Case("full-finetune", setting("model", "type", value="full"), "spec.model.type", "'lora'",
         api_text='supported values: "lora"'),
    Case("bad-model-s3-uri", setting("model", "source", value="s3:/my-models"), "spec.model.source",
         "model source must be"),
    Case("bad-model-hf-uri", setting("model", "source", value="hf://just-a-name"), "spec.model.source",
         "model source must be"),
    Case("empty-bucket", setting("output", "s3", "bucket", value=""), "spec.output.s3.bucket",
         "S3 bucket name"),
    Case("bucket-as-uri", setting("output", "s3", "bucket", value="s3://my-loras"),
         "spec.output.s3.bucket", "S3 bucket name"),
    Case("prefix-dotdot", lambda d: clips(d)["source"]["s3"].update(prefix="clips/../../secrets/"),
         "spec.datasets[0].source.s3.prefix", "'..' segments"),
    Case("prefix-leading-slash", lambda d: clips(d)["source"]["s3"].update(prefix="/clips/"),
         "spec.datasets[0].source.s3.prefix", "no leading '/'"),
    Case("endpoint-not-url", lambda d: clips(d)["source"]["s3"].update(endpoint="minio:9000"),
         "spec.datasets[0].source.s3.endpoint", "http(s) URL"),
    Case("bad-secret-name", lambda d: clips(d)["source"]["s3"].update(credentialsSecret="S3_Creds"),
         "spec.datasets[0].source.s3.credentialsSecret", "must name a Secret"),
    Case("output-both", lambda d: spec(d)["output"].update(local={"path": "/out"}), "spec.output.s3",
         "exactly one of s3"),
    Case("output-neither", setting("output", value={}), "spec.output.s3", "exactly one of s3"),
    Case("lora-format-unknown", setting("lora", "formats", value=["safetensors"]), "spec.lora.formats[0]",
         "'peft', 'official' or 'comfyui'", api_text='supported values: "peft", "official", "comfyui"'),
    Case("init-lora-neither", setting("lora", "initFrom", value={}), "spec.lora.initFrom.s3", "exactly one of s3"),
    Case("missing-output", lambda d: spec(d).pop("output"), "spec.output", "required",
         api_text='Required value'),
    Case("no-datasets", setting("datasets", value=[]), "spec.datasets", "at least 1 item",
         api_text="should have at least 1 items"),
    Case("ten-thousand-datasets", _many_datasets, "spec.datasets", "at most 64 items",
         api_text="must have at most 64 items"),
    Case("typo-field", setting("training", "learningrate", value=1e-4), "spec.training.learningrate",
         "not a field of LongCatI2VJob", api_text='unknown field "spec.training.learningrate"'),
    Case("long-name", lambda d: d["metadata"].update(name="a" * 41), "metadata.name",
         "at most 40 characters", api_path="metadata.name"),
    # Unicode and very long names, YAML of the wrong types, huge numbers, '..' in prefixes (the faults suite).
    Case("unicode-name", lambda d: d["metadata"].update(name="träning-ünïcode"), "metadata.name",
         "should match pattern", api_text="RFC 1123"),
    Case("long-dataset-id", lambda d: clips(d).update(id="c" * 200), "spec.datasets[0].id",
         "dataset id must be 1 to 63 lowercase", api_text=None),
    Case("long-prefix", lambda d: clips(d)["source"]["s3"].update(prefix="p/" * 2000),
         "spec.datasets[0].source.s3.prefix", "at most 1024", api_text=None),
    Case("unicode-bucket", setting("output", "s3", "bucket", value="büket"), "spec.output.s3.bucket",
         "S3 bucket name"),
    Case("datasets-mapping", setting("datasets", value={"clips": {"type": "video"}}), "spec.datasets",
         "valid list", api_text='unknown field "spec.datasets.clips"'),
    Case("lora-string", setting("lora", value="rank8"), "spec.lora", "valid dictionary",
         api_text="must be of type object"),
    Case("training-list", setting("training", value=[1, 2]), "spec.training", "valid dictionary",
         api_text="must be of type object"),
    Case("is-i2v-string", lambda d: clips(d).update(isI2V="yes"), "spec.datasets[0].isI2V", "valid boolean",
         api_text="must be of type boolean"),
    Case("conditioning-data-string", lambda d: clips(d).update(conditioningData="start-frames"),
         "spec.datasets[0].conditioningData", "valid list", api_text="must be of type array"),
    Case("nodes-fraction", setting("resources", "nodes", value=1.5), "spec.resources.nodes", "valid integer",
         api_text="must be of type integer"),
    Case("dataset-null", setting("datasets", value=[None]), "spec.datasets[0]", "valid dictionary",
         api_text=None),
    Case("max-steps-huge", setting("training", "maxSteps", value=10**12), "spec.training.maxSteps",
         "maxSteps must be at most 10,000,000 (at 10 s a step"),
    Case("max-steps-beyond-int64", setting("training", "maxSteps", value=2**64), "spec.training.maxSteps",
         "maxSteps must be at most 10,000,000", api_text=None),
    Case("checkpoint-every-0", setting("training", "checkpointEvery", value=0), "spec.training.checkpointEvery",
         "greater than or equal to 1", api_text=None),
    Case("negative-batch-size", setting("training", "batchSize", value=-1), "spec.training.batchSize",
         "greater than or equal to 1", api_text=None),
    Case("bad-fraction-above-1", setting("training", "maxBadSampleFraction", value=1.5),
         "spec.training.maxBadSampleFraction", "less than or equal to 1", api_text=None),
    Case("frames-huge", lambda d: clips(d).update(frames=10**6 + 1), "spec.datasets[0].frames",
         "frames must be at most 1025 (257 latent frames"),
    Case("resolution-huge", lambda d: clips(d).update(resolution=16 * 10**6), "spec.datasets[0].resolution",
         "resolution must be at most 2048 pixels"),
    Case("validation-resolution-beyond-2048", setting("validation", "resolution", value="99984x99984"),
         "spec.validation.resolution", "positive multiples of 16 up to 2048"),
    # What `validate` once accepted and the API server refused: snake_case names of real fields.
    Case("snake-case-field", setting("training", "learning_rate", value=1e-4), "spec.training.learning_rate",
         "fields are camelCase, write learningRate", api_text='unknown field "spec.training.learning_rate"'),
    Case("snake-case-dataset-field", lambda d: clips(d).update(caption_strategy="textfile"),
         "spec.datasets[0].caption_strategy", "write captionStrategy",
         api_text='unknown field "spec.datasets[0].caption_strategy"'),
    # S3's bucket naming rules beyond the characters (both were accepted once).
    Case("bucket-ip-address", setting("output", "s3", "bucket", value="192.168.5.4"),
         "spec.output.s3.bucket", "formatted as an IP address"),
    Case("bucket-two-dots", setting("output", "s3", "bucket", value="my..loras"),
         "spec.output.s3.bucket", "two periods in a row"),
    Case("bucket-reserved-prefix", setting("output", "s3", "bucket", value="xn--loras"),
         "spec.output.s3.bucket", "prefixes S3 reserves"),
    Case("bucket-reserved-suffix", setting("output", "s3", "bucket", value="loras-s3alias"),
         "spec.output.s3.bucket", "suffixes S3 reserves"),
    Case("prefix-empty-segment", lambda d: clips(d)["source"]["s3"].update(prefix="clips//train/"),
         "spec.datasets[0].source.s3.prefix", "no empty segments"),
    Case("validation-resolution-huge", setting("validation", "resolution", value="99999984x99999984"),
         "spec.validation.resolution", "HEIGHTxWIDTH", api_text="may not be more than 11 bytes"),
    Case("validation-resolution-unicode-x", setting("validation", "resolution", value="480×832"),
         "spec.validation.resolution", "HEIGHTxWIDTH"),
    Case("gpus-per-node-huge", setting("resources", "gpusPerNode", value=10**6), "spec.resources.gpusPerNode",
         "less than or equal to 16", api_text=None),
    Case("prefix-leading-dotdot", lambda d: clips(d)["source"]["s3"].update(prefix="../clips/"),
         "spec.datasets[0].source.s3.prefix", "'..' segments"),
    Case("output-prefix-dotdot", lambda d: spec(d)["output"]["s3"].update(prefix="out/../../"),
         "spec.output.s3.prefix", "'..' segments"),
    Case("vae-cache-prefix-dotdot",
         lambda d: clips(d).update(vaeCache={"s3": {"bucket": "my-cache", "prefix": "cache/.."}}),
         "spec.datasets[0].vaeCache.s3.prefix", "'..' segments"),
    Case("empty-lora-targets", setting("lora", "targets", value=[]), "spec.lora.targets", "at least 1 item",
         api_text=None),
    Case("negative-seed", setting("training", "seed", value=-1), "spec.training.seed",
         "greater than or equal to 0", api_text=None),
    Case("precision-fp64", setting("training", "precision", value="fp64"), "spec.training.precision",
         "'bf16' or 'fp32'", api_text='supported values: "bf16", "fp32"'),
    Case("negative-prompt-huge", setting("validation", "negativePrompt", value="x" * 100_000),
         "spec.validation.negativePrompt", "at most 4096 characters", api_text=None),
]
