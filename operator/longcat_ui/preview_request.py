"""A preview request as the form sends it, checked before it is queued (torch-free): every refusal names
the form field and says what to change. Sizes and frame counts are the job's validation settings; steps,
guidance, sampler, seed and negative prompt pass the job API's own rules (ValidationSpec)."""

from __future__ import annotations

import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from longcat_job.api import Sampler, ValidationSpec

MIN_SIDE = 16
MAX_IMAGE_BYTES = 32 * 1024 * 1024
# ValidationSpec's field -> the form's.
FORM_FIELDS = {"num_inference_steps": "steps", "guidance": "guidance", "sampler": "sampler", "seed": "seed",
               "negative_prompt": "negative_prompt"}


class FieldProblem(BaseModel):
    field: str
    message: str


class Refused(Exception):
    def __init__(self, problems: list[FieldProblem]) -> None:
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in problems))
        self.problems = problems


class PreviewForm(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job: str
    image: str = Field("", description="An uploaded start frame: base64, or a data: URL.")
    sample: str = Field("", description="Or the key of one of the job's validation start frames.")
    prompt: str = Field(min_length=1, max_length=4096)
    negative_prompt: str = ""
    steps: int
    guidance: float
    seed: int
    lora_strength: float = Field(1.0, ge=0, le=2)
    sampler: Sampler = "standard"
    lora: str = Field("", description="A LoRA folder of the job (lora/ or checkpoints/step-N/); empty: none.")


def parse_form(payload: object) -> PreviewForm:
    try:
        return PreviewForm.model_validate(payload)
    except ValidationError as exc:
        raise Refused([FieldProblem(field=".".join(str(p) for p in e["loc"]) or "(form)", message=e["msg"])
                       for e in exc.errors()]) from None


def settings(form: PreviewForm, job_validation: ValidationSpec) -> ValidationSpec:
    """The sampler settings: the job's resolution and frames, the form's steps, guidance, sampler, seed."""
    try:
        return ValidationSpec(resolution=job_validation.resolution, frames=job_validation.frames,
                              guidance_method=job_validation.guidance_method, num_inference_steps=form.steps,
                              guidance=form.guidance, sampler=form.sampler, seed=form.seed,
                              negative_prompt=form.negative_prompt)
    except ValidationError as exc:
        raise Refused([FieldProblem(field=FORM_FIELDS.get(str(e["loc"][0]), str(e["loc"][0])) if e["loc"] else "(form)",
                                    message=e["msg"]) for e in exc.errors()]) from None


def uploaded_image(text: str) -> bytes:
    """The bytes of an uploaded start frame, refused unless they decode as an image of at least MIN_SIDE px."""
    data_part = text.split(",", 1)[1] if text.startswith("data:") else text
    try:
        data = base64.b64decode(data_part, validate=True)
    except (binascii.Error, ValueError):
        raise Refused([FieldProblem(field="image", message="the upload is not base64 data")]) from None
    check_image(data, "image")
    return data


def check_image(data: bytes, field: str) -> None:
    if len(data) > MAX_IMAGE_BYTES:
        raise Refused([FieldProblem(field=field, message=f"the file is {len(data)} bytes; the limit is "
                                    f"{MAX_IMAGE_BYTES} (a start frame is one PNG or JPEG picture)")])
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            width, height = image.size
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise Refused([FieldProblem(field=field, message="the file cannot be decoded as an image "
                                    f"({type(exc).__name__}); upload a PNG or JPEG start frame")]) from None
    if min(width, height) < MIN_SIDE:
        raise Refused([FieldProblem(field=field, message=f"the image is {width}x{height} px; a start frame needs "
                                    f"at least {MIN_SIDE} px on each side (it is scaled to the job's resolution)")])
