"""The LongCatI2VJob API: spec and status of one image-to-video LoRA training job.

This module is the single definition of the job. The CRD in `crds/` is generated from it (`crd.py`), the CLI and
the webhook validate with it, and the trainer reads its settings from it. It must stay torch-free.

Defaults are those of the seed document (SimpleTuner's LongCat-Video I2V quickstart); the SimpleTuner setting
each field carries is named in its description. YAML uses camelCase (`learningRate`), Python snake_case.
"""

from __future__ import annotations

import re
from datetime import datetime
from enum import Enum
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, GetJsonSchemaHandler, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError, core_schema

from .rules import CEL_KEY, FieldRule, Immutable, ObjectRule, at_most, multiple_of, regex_rule

GROUP = "longcat.video"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LongCatI2VJob"
PLURAL = "longcati2vjobs"
SINGULAR = "longcati2vjob"
SHORT_NAME = "lcj"

# The operator names the Job, Service and pods `<name>-...`; pod hostnames must stay within 63 characters.
MAX_JOB_NAME = 40
JOB_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
# Keys the credentials Secret must hold (the names every S3 client reads from the environment).
SECRET_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
SECRET_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"

DEFAULT_LORA_TARGETS = ["qkv", "proj", "q_linear", "kv_linear"]
DEFAULT_MODEL_SOURCE = "hf://meituan-longcat/LongCat-Video"


class ApiModel(BaseModel):
    """Base of every API object: camelCase in YAML, unknown fields refused, cross-field rules checked."""

    # strict: "93" is not a number here either, as the API server would refuse it.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True)
    object_rules: ClassVar[tuple[ObjectRule, ...]] = ()

    @model_validator(mode="after")
    def _check_object_rules(self) -> ApiModel:
        problems = [[path, rule.message] for rule in self.object_rules for path in rule.violations(self)]
        if problems:
            text = "; ".join(f"{path}: {message}" for path, message in problems)
            raise PydanticCustomError("longcat_object_rule", text, {"problems": problems})
        return self

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        json_schema = handler(schema)
        if cls.object_rules:
            target = handler.resolve_ref_schema(json_schema)
            target.setdefault(CEL_KEY, []).extend(rule.as_cel() for rule in cls.object_rules)
        return json_schema


# --- rules on single values ---------------------------------------------------------------------------------

FramesRule = FieldRule(
    cel="(self - 1) % 4 == 0",
    message="frames must satisfy (frames - 1) % 4 == 0 (the VAE keeps the first frame and compresses the rest "
    "4x in time): use 93, 89, 81, 61 or 33",
    check=lambda frames: (frames - 1) % 4 == 0,
)
SideRule = multiple_of(
    16, "must be a multiple of 16 (the VAE downsamples 8x and the DiT uses 2x2 patches): use e.g. 480 or 832"
)
AlignmentRule = multiple_of(16, "aspectBucketAlignment must be a positive multiple of 16: use 64 (the default) or 16")
# Sides above this hold more pixels than LongCat's 720p output by a wide margin: a typo, not a plan.
MAX_SIDE = 2048
MAX_DURATION_S = 366 * 24 * 3600  # a year: longer is a typo, not a plan
_RESOLUTION = r"^([0-9]{1,5})x([0-9]{1,5})$"
ResolutionRule = FieldRule(
    cel="self.matches('^[0-9]{1,5}x[0-9]{1,5}$') && "
    f"self.split('x').all(s, int(s) % 16 == 0 && int(s) > 0 && int(s) <= {MAX_SIDE})",
    message=f"resolution must be HEIGHTxWIDTH with both sides positive multiples of 16 up to {MAX_SIDE} (LongCat "
    "renders 480x832 and 720x1280), e.g. 480x832 or 832x480",
    check=lambda text: (m := re.fullmatch(_RESOLUTION, text)) is not None
    and all(0 < int(side) <= MAX_SIDE and int(side) % 16 == 0 for side in m.groups()),
)
SideLimitRule = at_most(MAX_SIDE, f"resolution must be at most {MAX_SIDE} pixels (LongCat renders 480p and 720p): "
                        "use e.g. 480 or 720")
FramesLimitRule = at_most(
    1025, "frames must be at most 1025 (257 latent frames: at 480x832 over 100,000 tokens a sample, more than a "
    "context-parallel gang of 8 GPUs holds): use 93, 61 or 33"
)
RankLimitRule = at_most(
    1024, "rank must be at most 1024 (the DiT's layers are 4096 wide: an adapter of rank 1024 is no longer low "
    "rank): SimpleTuner's LongCat default is 8"
)
# The released DiT's attention heads; Ulysses hands each rank of a group a whole number of them.
RELEASED_HEADS = 32
ContextParallelRule = FieldRule(
    cel=f"{RELEASED_HEADS} % self == 0",
    message=f"contextParallel must divide the model's {RELEASED_HEADS} attention heads (each GPU of a group "
    "attends with a share of them): use 1, 2, 4, 8 or 16",
    check=lambda n: RELEASED_HEADS % n == 0,
)
StepsLimitRule = at_most(
    10_000_000, "maxSteps must be at most 10,000,000 (at 10 s a step, three years of training)"
)
# S3's bucket naming rules, each with its own message (docs.aws.amazon.com/AmazonS3/latest/userguide/
# bucketnamingrules.html): characters and length, no adjacent periods, not an IP address, reserved prefixes
# and suffixes.
BucketRules = (
    regex_rule(
        r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$",
        "bucket must be an S3 bucket name: 3 to 63 lowercase letters, digits, dots or hyphens, starting and ending "
        "with a letter or digit (no s3:// and no slashes: put the path in prefix)",
    ),
    FieldRule(cel="!self.contains('..')", message="bucket must not contain two periods in a row (S3 refuses it)",
              check=lambda name: ".." not in name),
    FieldRule(
        cel="!self.matches('^[0-9]{1,3}[.][0-9]{1,3}[.][0-9]{1,3}[.][0-9]{1,3}$')",
        message="bucket must not be formatted as an IP address such as 192.168.5.4 (S3 refuses it)",
        check=lambda name: re.fullmatch(r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}", name) is None,
    ),
    FieldRule(
        cel="!self.startsWith('xn--') && !self.startsWith('sthree-') && !self.startsWith('amzn-s3-demo-')",
        message="bucket must not start with xn--, sthree- or amzn-s3-demo- (prefixes S3 reserves)",
        check=lambda name: not name.startswith(("xn--", "sthree-", "amzn-s3-demo-")),
    ),
    FieldRule(
        cel="!self.endsWith('-s3alias') && !self.endsWith('--ol-s3') && !self.endsWith('.mrap') && "
        "!self.endsWith('--x-s3') && !self.endsWith('--table-s3')",
        message="bucket must not end with -s3alias, --ol-s3, .mrap, --x-s3 or --table-s3 (suffixes S3 reserves)",
        check=lambda name: not name.endswith(("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")),
    ),
)
PrefixRule = FieldRule(
    cel="!self.startsWith('/') && !self.matches('(^|/)[.]{1,2}(/|$)') && !self.contains('//') && "
    "!self.matches('[\\x00-\\x1f\\x7f]')",
    message="prefix must be a key prefix such as 'datasets/clips/': no leading '/', no '.' or '..' segments, no "
    "empty segments ('//') and no control characters",
    check=lambda prefix: not prefix.startswith("/") and not {".", ".."} & set(prefix.split("/"))
    and "//" not in prefix and re.search(r"[\x00-\x1f\x7f]", prefix) is None,
)
EndpointRule = regex_rule(
    r"^https?://[^/\s]+(/[^\s]*)?$", "endpoint must be an http(s) URL such as https://s3.us-east-1.amazonaws.com"
)
# Names of namespaced objects (DNS-1123 subdomains).
OBJECT_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
SecretNameRule = regex_rule(
    OBJECT_NAME_PATTERN, "must name a Secret in the job's namespace (lowercase letters, digits, '-' and '.')"
)
ClaimNameRule = regex_rule(
    OBJECT_NAME_PATTERN,
    "must name a PersistentVolumeClaim in the job's namespace (lowercase letters, digits, '-' and '.')",
)
DatasetIdRule = regex_rule(
    r"^[a-z0-9]([-a-z0-9_.]{0,61}[a-z0-9])?$",
    "dataset id must be 1 to 63 lowercase letters, digits, '-', '_' or '.', starting and ending with a letter "
    "or digit",
)
ModelSourceRule = regex_rule(
    r"^(hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+(@[-A-Za-z0-9_./]+)?"
    r"|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[^\s]*)?|file://[^\s]+|[^:\s][^:]*)$",
    "model source must be hf://ORG/REPO[@REVISION], s3://BUCKET/PREFIX or a local directory path",
)
LocalPathRule = regex_rule(r"^(file://)?[^:\s][^:]*$", "path must be a local directory path (or file://PATH)")


# --- where data lives -----------------------------------------------------------------------------------------


class S3Access(ApiModel):
    """How to reach an S3-compatible store. Credentials come only from a Secret, never from the spec."""

    endpoint: Annotated[str, EndpointRule, Field(max_length=2048)] | None = Field(
        None, description="S3 endpoint URL; empty means AWS, or the operator's default endpoint."
    )
    region: str = Field("us-east-1", min_length=1, max_length=64, description="S3 region.")
    credentials_secret: Annotated[str, SecretNameRule, Field(max_length=253)] | None = Field(
        None,
        description=f"Secret in the job's namespace with keys {SECRET_ACCESS_KEY_ID} and "
        f"{SECRET_SECRET_ACCESS_KEY}; empty means the pod's own identity (IRSA, workload identity).",
    )


class S3Location(S3Access):
    """Objects under `s3://bucket/prefix`."""

    bucket: Annotated[str, *BucketRules, Field(max_length=63)]
    prefix: Annotated[str, PrefixRule, Field(max_length=1024)] = Field("", description="Key prefix, e.g. 'clips/'.")

    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


class LocalLocation(ApiModel):
    """A directory on this machine: for `longcat-i2v run` only (SimpleTuner's `"type": "local"`)."""

    path: Annotated[str, LocalPathRule, Field(min_length=1, max_length=4096)]


class Location(ApiModel):
    """Exactly one of `s3` or `local`."""

    s3: S3Location | None = None
    local: LocalLocation | None = None

    object_rules = (
        ObjectRule(
            cel="has(self.s3) != has(self.local)",
            field_path=".s3",
            message="a location needs exactly one of s3 (bucket, prefix, ...) or local (path)",
            violations=lambda loc: [] if (loc.s3 is None) != (loc.local is None) else ["s3"],
        ),
    )

    def uri(self) -> str:
        return self.s3.uri() if self.s3 else self.local.path


# --- the spec ---------------------------------------------------------------------------------------------------


class ModelSpec(ApiModel):
    """The base model to adapt."""

    family: Literal["longcat_video"] = Field("longcat_video", description="SimpleTuner model_family.")
    flavour: Literal["final"] = Field(
        "final", description="SimpleTuner model_flavour; `final` serves text-to-video and image-to-video alike."
    )
    type: Literal["lora"] = Field("lora", description="SimpleTuner model_type; only LoRA training is offered.")
    source: Annotated[str, ModelSourceRule, Field(max_length=2048)] = Field(
        DEFAULT_MODEL_SOURCE,
        description="Checkpoint in the official layout (dit/, vae/, text_encoder/, tokenizer/, scheduler/): "
        "hf://ORG/REPO[@REVISION], s3://BUCKET/PREFIX or a local directory.",
    )
    storage: S3Access | None = Field(None, description="Endpoint and credentials for an s3:// source.")
    hf_token_secret: Annotated[str, SecretNameRule, Field(max_length=253)] | None = Field(
        None, description="Secret with key HF_TOKEN, for private hf:// repositories."
    )


class LoraSpec(ApiModel):
    rank: Annotated[int, RankLimitRule] = Field(8, ge=1, description="SimpleTuner lora_rank.")
    alpha: float | None = Field(
        None, gt=0, le=4096, description="SimpleTuner lora_alpha; empty means equal to rank (scale 1)."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="SimpleTuner lora_dropout.")
    targets: list[Annotated[str, Field(min_length=1, max_length=128)]] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        max_length=32,
        description="Module names of the DiT that get adapters (self-attention qkv/proj, cross-attention "
        "q_linear/kv_linear by default).",
    )
    formats: list[Literal["peft", "official", "comfyui"]] = Field(
        default_factory=lambda: ["peft", "official", "comfyui"], min_length=1, max_length=3,
        description="LoRA files written (final and in checkpoints): `peft` pytorch_lora_weights.safetensors and "
        "adapter_config.json (peft, diffusers), `official` longcat_video_lora.safetensors (LongCat-Video's own "
        "loader), `comfyui` longcat_video_lora_comfyui.safetensors (ComfyUI-WanVideoWrapper's LongCat path).",
    )
    init_from: Location | None = Field(
        None,
        description="SimpleTuner init_lora: a folder holding a LoRA of ours to start from (pytorch_lora_weights."
        "safetensors, else longcat_video_lora.safetensors: a finished job's lora/ or a checkpoint's folder); its "
        "rank and targets must be the spec's. A resumed job starts from its own checkpoint instead. Empty: fresh "
        "adapters.",
    )


class EmaSpec(ApiModel):
    """An exponential moving average of the adapter weights, kept beside them (SimpleTuner use_ema)."""

    decay: float = Field(0.999, gt=0, lt=1, description="SimpleTuner ema_decay: ema = decay * ema + (1 - decay) * w.")
    every_steps: int = Field(1, ge=1, le=1_000_000, description="SimpleTuner ema_update_interval, in optimizer steps.")
    device: Literal["gpu", "cpu"] = Field(
        "gpu", description="SimpleTuner ema_device: where the average lives; `cpu` spares GPU memory and costs a "
        "copy of the adapters to the host at every update."
    )


class TrainingSpec(ApiModel):
    batch_size: int = Field(1, ge=1, le=64, description="SimpleTuner train_batch_size (per GPU).")
    gradient_checkpointing: bool = Field(True, description="SimpleTuner gradient_checkpointing.")
    learning_rate: float = Field(1e-4, gt=0, le=1, description="SimpleTuner learning_rate.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant_with_warmup", description="SimpleTuner lr_scheduler."
    )
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="SimpleTuner lr_warmup_steps.")
    max_steps: Annotated[int, StepsLimitRule] = Field(1000, ge=1, description="SimpleTuner max_train_steps.")
    gradient_accumulation: int = Field(1, ge=1, le=1024, description="SimpleTuner gradient_accumulation_steps.")
    max_grad_norm: float = Field(1.0, gt=0, le=1000, description="SimpleTuner max_grad_norm.")
    weight_decay: float = Field(0.01, ge=0, le=1, description="AdamW weight decay.")
    flow_shift: float = Field(
        12.0, gt=0, le=100, description="SimpleTuner flow_schedule_shift: sigma' = s*sigma / (1 + (s-1)*sigma)."
    )
    seed: int = Field(42, ge=0, le=2**31 - 1, description="SimpleTuner seed; each rank derives its own.")
    precision: Literal["bf16", "fp32"] = Field("bf16", description="SimpleTuner mixed_precision.")
    base_quantization: Literal["int8-quanto", "fp8-torchao"] | None = Field(
        None,
        description="SimpleTuner base_model_precision: the frozen base's block weights in 8 bits (about 12 GiB "
        "less). fp8-torchao also runs those matmuls in FP8 on GPUs that have FP8 tensor cores (faster, less "
        "exact); int8-quanto keeps bf16 matmuls.",
    )
    parallelism: Literal["ddp", "fsdp"] = Field(
        "ddp", description="ddp replicates the frozen base on every GPU; fsdp shards it (for small GPUs)."
    )
    offload: Literal["none", "blocks"] = Field(
        "none",
        description="SimpleTuner enable_group_offload. `blocks`: the frozen base's block weights stay in pinned "
        "host memory and each block's are copied to the GPU on a side stream while the one before it computes "
        "(forward, and in reverse for backward): the GPU holds two blocks' weights (about 1.1 GiB) instead of "
        "27 GB, for GPUs of 48 or 24 GB; the node needs about 30 GB of host memory per GPU for them. "
        "Not with parallelism fsdp or baseQuantization.",
    )
    context_parallel: Annotated[int, ContextParallelRule] = Field(
        1, ge=1, le=16,
        description="GPUs that share one sample (Ulysses context parallelism: its tokens split over them, attention "
        "by head shards); 1 is off. For samples that do not fit one GPU (720p, long clips): it does not raise the "
        "throughput of samples that do. The groups are consecutive GPUs of one pod, so gpusPerNode must be a "
        "multiple of it; batchSize is then per group.",
    )
    checkpoint_every: int = Field(100, ge=1, le=1_000_000, description="SimpleTuner checkpointing_steps.")
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="SimpleTuner checkpoints_total_limit.")
    max_bad_sample_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the job when more than this fraction of samples is unreadable."
    )
    ema: EmaSpec | None = Field(
        None,
        description="An EMA of the adapter weights: saved in checkpoints, exported to lora/ema/ beside the LoRA, and "
        "used for the validation videos. Empty: no EMA.",
    )

    object_rules = (
        ObjectRule(
            cel="!has(self.offload) || self.offload == 'none' || !has(self.parallelism) || self.parallelism != 'fsdp'",
            field_path=".offload",
            message="offload: blocks streams every GPU's whole copy of the block weights from host memory, "
            "parallelism: fsdp shards them over the GPUs instead: choose one (remove offload, or set parallelism: "
            "ddp)",
            violations=lambda t: ["offload"] if t.offload != "none" and t.parallelism == "fsdp" else [],
        ),
        ObjectRule(
            cel="!has(self.offload) || self.offload == 'none' || !has(self.baseQuantization)",
            field_path=".offload",
            message="offload: blocks streams the bf16 block weights and cannot be combined with baseQuantization "
            "(its 8-bit weights are made on the GPU): remove one of them",
            violations=lambda t: ["offload"] if t.offload != "none" and t.base_quantization is not None else [],
        ),
    )


class DatasetSpec(ApiModel):
    """One entry of SimpleTuner's multidatabackend.json."""

    id: Annotated[str, DatasetIdRule, Field(max_length=63)]
    type: Literal["video", "conditioning"] = Field(
        description="SimpleTuner dataset_type: `video` holds clips and captions, `conditioning` holds start frames."
    )
    is_i2v: bool = Field(False, alias="isI2V", description="SimpleTuner is_i2v: clips start from a conditioning frame.")
    source: Location = Field(description="SimpleTuner instance_data_dir (local) or aws_bucket_name/aws_data_prefix.")
    caption_strategy: Literal["textfile"] | None = Field(
        None, description="SimpleTuner caption_strategy: `textfile` reads <stem>.txt beside each clip; empty: none."
    )
    resolution: Annotated[int, SideRule, SideLimitRule] = Field(
        480, ge=16, description="SimpleTuner resolution: target short side in pixels."
    )
    frames: Annotated[int, FramesRule, FramesLimitRule] = Field(93, ge=5, description="SimpleTuner video.num_frames.")
    frame_buckets: list[Annotated[int, FramesRule, FramesLimitRule, Field(ge=5)]] | None = Field(
        None, min_length=1, max_length=16,
        description="Frame counts a clip may train at (each with (n - 1) % 4 == 0): a clip trains at the largest "
        "it can fill, from its frame 0; shorter clips than the smallest are skipped. Empty: [frames].",
    )
    caption_dropout: float = Field(
        0.0, ge=0, le=1,
        description="SimpleTuner caption_dropout_probability: the chance that a sample trains on the empty prompt's "
        "text states instead of its caption's, drawn per (seed, step, sample) so a resumed run draws the same.",
    )
    conditioning_data: list[Annotated[str, Field(max_length=63)]] = Field(
        default_factory=list, max_length=8, description="SimpleTuner conditioning_data: ids of start-frame datasets."
    )
    vae_cache: Location | None = Field(
        None, description="SimpleTuner cache_dir_vae; empty means under the output location's cache/<id>/."
    )

    def frame_counts(self) -> tuple[int, ...]:
        """The frame buckets, ascending: `frameBuckets`, or `frames` alone."""
        return tuple(sorted(set(self.frame_buckets or [self.frames])))

    object_rules = (
        ObjectRule(
            cel="self.type != 'video' || !self.isI2V || (has(self.conditioningData) && size(self.conditioningData) > 0)",
            field_path=".conditioningData",
            message="a video dataset with isI2V: true needs conditioningData naming its start-frame dataset",
            violations=lambda d: ["conditioningData"] if d.type == "video" and d.is_i2v and not d.conditioning_data else [],
        ),
        ObjectRule(
            cel="self.type != 'conditioning' || !has(self.captionStrategy)",
            field_path=".captionStrategy",
            message="a conditioning dataset holds start frames without captions: remove captionStrategy",
            violations=lambda d: ["captionStrategy"] if d.type == "conditioning" and d.caption_strategy else [],
        ),
        ObjectRule(
            cel="self.type != 'conditioning' || !has(self.conditioningData) || size(self.conditioningData) == 0",
            field_path=".conditioningData",
            message="only video datasets take conditioningData: remove it from the conditioning dataset",
            violations=lambda d: ["conditioningData"] if d.type == "conditioning" and d.conditioning_data else [],
        ),
    )


# validation.sampler's choices: `longcat-i2v sample --sampler` and the UI's preview form offer these; the
# trainer's sampler (denoise.py) takes the same names.
Sampler = Literal["standard", "distilled"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)
GuidanceMethod = Literal["cfg", "optimized"]


class ValidationSpec(ApiModel):
    resolution: Annotated[str, ResolutionRule, Field(max_length=11)] = Field(
        "480x832", description="SimpleTuner validation_resolution, HEIGHTxWIDTH (LongCat's 480x832 is landscape)."
    )
    frames: Annotated[int, FramesRule, FramesLimitRule] = Field(
        93, ge=5, description="SimpleTuner validation_num_video_frames."
    )
    num_inference_steps: int = Field(40, ge=1, le=1000, description="SimpleTuner validation_num_inference_steps.")
    guidance: float = Field(
        4.0, ge=1, le=30, description="SimpleTuner validation_guidance; 1.0 turns classifier-free guidance off."
    )
    guidance_method: GuidanceMethod = Field(
        "cfg", description="`cfg` is classic guidance; `optimized` is the official pipeline's optimized scale."
    )
    sampler: Sampler = Field(
        "standard",
        description="`standard` samples with numInferenceSteps and guidance; `distilled` with the checkpoint's "
        "lora/cfg_step_lora.safetensors on top of the trained LoRA, 16 steps, no guidance (previews in a fraction "
        "of the time).",
    )
    negative_prompt: str = Field(
        "", max_length=4096, description="Filled in (empty) automatically when guidance is above 1."
    )
    using_datasets: bool = Field(True, description="SimpleTuner validation_using_datasets.")
    eval_dataset_id: Annotated[str, Field(max_length=63)] | None = Field(
        None, description="SimpleTuner eval_dataset_id: the video dataset of the validation split."
    )
    every_steps: int = Field(
        0, ge=0, le=1_000_000, description="SimpleTuner validation_steps; 0 validates only at the end."
    )
    max_samples: int = Field(2, ge=1, le=64, description="Validation videos per run.")
    seed: int = Field(42, ge=0, le=2**31 - 1, description="SimpleTuner validation_seed, fixed across steps.")


class Toleration(ApiModel):
    key: Annotated[str, Field(max_length=316)] | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: Annotated[str, Field(max_length=63)] | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


# The variable that tells the trainer where resolved model sources are kept (the pods' model cache mount).
MODEL_CACHE_ENV = "LONGCAT_MODEL_CACHE"


class ModelCacheSpec(ApiModel):
    claim_name: Annotated[str, ClaimNameRule, Field(max_length=253)] = Field(
        description="PersistentVolumeClaim in the job's namespace (ReadWriteMany for several nodes) that keeps "
        "resolved model sources (s3://, hf://) across gang restarts and jobs; the pods mount it at "
        "/cache/models."
    )


class ResourcesSpec(ApiModel):
    nodes: int = Field(1, ge=1, le=512, description="Pods in the gang, one per node.")
    gpus_per_node: int = Field(1, ge=1, le=16, description="GPUs (and torchrun processes) per pod.")
    image: Annotated[str, Field(min_length=1, max_length=1024)] | None = Field(
        None, description="Trainer image; empty means the operator's default."
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63)]] = Field(default_factory=dict, max_length=64)
    tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    priority_class_name: Annotated[str, Field(max_length=253)] | None = None
    queue_name: Annotated[str, Field(max_length=63)] | None = Field(
        None, description="Kueue LocalQueue; the Job is created suspended and Kueue admits it."
    )
    shm_size: str = Field(
        "32Gi", pattern=r"^[0-9]+(Ki|Mi|Gi|Ti)$", max_length=16, description="Size of the memory-backed /dev/shm."
    )
    model_cache: ModelCacheSpec | None = Field(
        None, description="Where the model is kept between attempts; empty: each attempt downloads it into the "
        "pod's scratch space (about 40 GB per node for LongCat-Video)."
    )


def _duplicate_ids(spec: JobSpec) -> list[str]:
    seen: set[str] = set()
    paths = []
    for i, dataset in enumerate(spec.datasets):
        if dataset.id in seen:
            paths.append(f"datasets[{i}].id")
        seen.add(dataset.id)
    return paths


def _unknown_conditioning(spec: JobSpec) -> list[str]:
    ids = {d.id for d in spec.datasets}
    return [
        f"datasets[{i}].conditioningData[{j}]"
        for i, d in enumerate(spec.datasets)
        for j, ref in enumerate(d.conditioning_data)
        if ref not in ids
    ]


def _conditioning_of_wrong_type(spec: JobSpec) -> list[str]:
    types = {d.id: d.type for d in spec.datasets}
    return [
        f"datasets[{i}].conditioningData[{j}]"
        for i, d in enumerate(spec.datasets)
        for j, ref in enumerate(d.conditioning_data)
        if types.get(ref, "conditioning") != "conditioning"
    ]


def latent_frames(frames: int) -> int:
    return (frames - 1) // 4 + 1  # the VAE keeps the first frame and compresses the rest 4x in time


def _splits(frames: int, n: int) -> bool:
    """Whether `frames` split into whole latent frames over n GPUs, two at least on each (the start frame's GPU
    needs a frame to denoise, or its cross-attention adapters would get no gradient)."""
    return latent_frames(frames) % n == 0 and latent_frames(frames) >= 2 * n


FRAMES_SPLIT_MESSAGE = (
    "with training.contextParallel each GPU of a group takes whole latent frames: the latent frames "
    "((frames - 1) / 4 + 1) of {what} must be divisible by it, two at least on each GPU (93 frames are 24 latent "
    "frames: contextParallel 2, 4 or 8)"
)

_CP = "self.training.contextParallel"


def _cel_splits(frames: str) -> str:
    latent = f"(({frames} - 1) / 4 + 1)"
    return f"({latent} % {_CP} == 0 && {latent} >= 2 * {_CP})"


def _eval_dataset(spec: JobSpec) -> DatasetSpec | None:
    return next((d for d in spec.datasets if d.id == spec.validation.eval_dataset_id), None)


class JobSpec(ApiModel):
    model: Annotated[ModelSpec, Immutable("spec.model")] = Field(default_factory=ModelSpec)
    lora: LoraSpec = Field(default_factory=LoraSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    datasets: Annotated[list[DatasetSpec], Immutable("spec.datasets")] = Field(
        min_length=1, max_length=64, description="SimpleTuner multidatabackend.json."
    )
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    aspect_bucket_alignment: Annotated[int, AlignmentRule] = Field(
        64, ge=16, le=1024, description="SimpleTuner aspect_bucket_alignment: training buckets are multiples of it."
    )
    output: Annotated[Location, Immutable("spec.output")] = Field(
        description="SimpleTuner output_dir: LoRA weights, checkpoints, validation videos, progress.json."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    max_restarts: int = Field(3, ge=0, le=100, description="Gang restarts before the job is marked Failed.")
    suspend: bool = Field(False, description="Suspends the gang (pods are deleted, checkpoints stay).")
    ttl_seconds_after_finished: int | None = Field(
        None, ge=0, le=MAX_DURATION_S,
        description="After Succeeded or Failed, the gang's Jobs, Service and ConfigMap are deleted after this many "
        "seconds; the job itself and its artifacts in S3 stay (as a Job's ttlSecondsAfterFinished, but keeping the "
        "record). Empty: kept until the job is deleted.",
    )
    active_deadline_seconds: int | None = Field(
        None, ge=1, le=MAX_DURATION_S,
        description="Longest time the gang may run: then its pods get SIGTERM (the trainer saves a checkpoint) and "
        "the job fails with reason DeadlineExceeded. Counted from the launch; a resume starts the clock again, as "
        "a Job's activeDeadlineSeconds does.",
    )

    object_rules = (
        ObjectRule(
            cel="self.datasets.all(d, self.datasets.exists_one(e, e.id == d.id))",
            field_path=".datasets",
            message="dataset ids must be unique: rename the duplicate id",
            violations=_duplicate_ids,
        ),
        ObjectRule(
            cel="self.datasets.all(d, !has(d.conditioningData) || "
            "d.conditioningData.all(c, self.datasets.exists(e, e.id == c)))",
            field_path=".datasets",
            message="conditioningData names a dataset that spec.datasets does not declare: add that dataset "
            "(type: conditioning) or fix the id",
            violations=_unknown_conditioning,
        ),
        ObjectRule(
            cel="self.datasets.all(d, !has(d.conditioningData) || "
            "d.conditioningData.all(c, !self.datasets.exists(e, e.id == c && e.type != 'conditioning')))",
            field_path=".datasets",
            message="conditioningData must name a dataset of type conditioning (the start frames)",
            violations=_conditioning_of_wrong_type,
        ),
        ObjectRule(
            cel="!has(self.validation) || !has(self.validation.evalDatasetId) || "
            "self.datasets.exists(e, e.id == self.validation.evalDatasetId && e.type == 'video')",
            field_path=".validation.evalDatasetId",
            message="evalDatasetId must name a video dataset declared in spec.datasets: add the validation split "
            "(a video dataset with its conditioning dataset) or fix the id",
            violations=lambda spec: ["validation.evalDatasetId"]
            if spec.validation.eval_dataset_id is not None
            and ((d := _eval_dataset(spec)) is None or d.type != "video")
            else [],
        ),
        ObjectRule(
            cel="self.datasets.exists(d, d.type == 'video' && "
            "(!has(self.validation) || !has(self.validation.evalDatasetId) || d.id != self.validation.evalDatasetId))",
            field_path=".datasets",
            message="spec.datasets needs at least one video dataset to train on (besides the validation split)",
            violations=lambda spec: []
            if any(d.type == "video" and d.id != spec.validation.eval_dataset_id for d in spec.datasets)
            else ["datasets"],
        ),
        ObjectRule(
            cel=f"self.resources.gpusPerNode % {_CP} == 0",
            field_path=".training.contextParallel",
            message="resources.gpusPerNode must be a multiple of training.contextParallel (a sample's GPUs are "
            "in one pod, where the attention all-to-alls run over NVLink): lower contextParallel or raise "
            "gpusPerNode",
            violations=lambda spec: ["training.contextParallel"]
            if spec.resources.gpus_per_node % spec.training.context_parallel else [],
        ),
        ObjectRule(
            cel=f"self.datasets.all(d, d.type != 'video' || {_cel_splits('d.frames')})",
            field_path=".datasets",
            message=FRAMES_SPLIT_MESSAGE.format(what="every video dataset"),
            violations=lambda spec: [f"datasets[{i}].frames" for i, d in enumerate(spec.datasets)
                                     if d.type == "video" and not _splits(d.frames, spec.training.context_parallel)],
        ),
        ObjectRule(
            cel=_cel_splits("self.validation.frames"),
            field_path=".validation.frames",
            message=FRAMES_SPLIT_MESSAGE.format(what="validation"),
            violations=lambda spec: []
            if _splits(spec.validation.frames, spec.training.context_parallel) else ["validation.frames"],
        ),
    )

    def dataset(self, dataset_id: str) -> DatasetSpec:
        return next(d for d in self.datasets if d.id == dataset_id)

    def training_datasets(self) -> list[DatasetSpec]:
        """Video datasets used for training: every video dataset except the validation split."""
        return [d for d in self.datasets if d.type == "video" and d.id != self.validation.eval_dataset_id]


# --- the status -------------------------------------------------------------------------------------------------


class Phase(str, Enum):
    PENDING = "Pending"
    VALIDATING = "Validating"
    LAUNCHING = "Launching"
    CACHING = "Caching"
    TRAINING = "Training"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class Condition(ApiModel):
    """The shape of metav1.Condition."""

    type: str = Field(max_length=316)
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(max_length=1024)
    message: str = Field("", max_length=32768)
    observed_generation: int | None = Field(None, ge=0)
    last_transition_time: datetime = Field(strict=False)


class Progress(ApiModel):
    step: int = Field(0, ge=0)
    max_steps: int = Field(0, ge=0)
    step_display: str | None = Field(None, description="step/maxSteps, for `kubectl get`.")
    loss: float | None = None
    learning_rate: float | None = None
    samples_per_second: float | None = None
    eta_seconds: float | None = None
    eta_display: str | None = Field(None, description="eta_seconds as 1h02m, for `kubectl get`.")


class Artifacts(ApiModel):
    lora: str | None = Field(None, description="URI of the final LoRA: pytorch_lora_weights.safetensors, or the "
                             "first of spec.lora.formats when peft is not among them.")
    checkpoints: list[str] = Field(default_factory=list)
    latest_checkpoint: str | None = None
    validation_videos: list[str] = Field(default_factory=list)
    manifest: str | None = None
    report: str | None = Field(None, description="URI of index.html with videos and the loss curve.")


class DatasetStatus(ApiModel):
    id: str
    objects: int = Field(0, ge=0)
    samples: int = Field(0, ge=0, description="Complete samples: clip, start frame and caption where required.")
    problems: int = Field(0, ge=0)
    first_problems: list[str] = Field(default_factory=list, max_length=20)


class JobStatus(ApiModel):
    phase: Phase | None = Field(None, strict=False)
    conditions: list[Condition] = Field(default_factory=list)
    observed_generation: int | None = Field(None, ge=0)
    progress: Progress | None = None
    artifacts: Artifacts | None = None
    datasets: list[DatasetStatus] = Field(default_factory=list)
    restarts: int = Field(0, ge=0)
    start_time: datetime | None = Field(None, strict=False)
    completion_time: datetime | None = Field(None, strict=False)


class ObjectMeta(BaseModel):
    """metadata: the name the job API checks, and the other fields of Kubernetes' ObjectMeta as they are (an
    unknown field is refused, as the API server refuses it)."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")
    # kubectl apply needs a name; the operator names the Job, Service and pods after it.
    name: str = Field(min_length=1, max_length=MAX_JOB_NAME, pattern=JOB_NAME_PATTERN)
    namespace: str | None = None
    generate_name: str | None = None
    uid: str | None = None
    resource_version: str | None = None
    generation: int | None = None
    creation_timestamp: str | None = None
    deletion_timestamp: str | None = None
    deletion_grace_period_seconds: int | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    owner_references: list[dict[str, Any]] | None = None
    finalizers: list[str] | None = None
    managed_fields: list[dict[str, Any]] | None = None
    self_link: str | None = None


class LongCatI2VJob(ApiModel):
    api_version: Literal["longcat.video/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["LongCatI2VJob"] = KIND
    metadata: ObjectMeta
    spec: JobSpec
    status: JobStatus | None = None


def resource_schema(spec_or_status: type[BaseModel]) -> dict[str, Any]:
    """The JSON schema of a spec or status model, by alias, as the CRD generator consumes it."""
    return spec_or_status.model_json_schema(by_alias=True, mode="validation", ref_template="#/$defs/{model}")
