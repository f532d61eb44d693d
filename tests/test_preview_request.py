"""The preview form's check, before anything is queued: each refusal names the form's field."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from longcat_job.api import ValidationSpec
from longcat_ui.preview_request import MIN_SIDE, Refused, parse_form, settings, uploaded_image

JOB = ValidationSpec(resolution="64x112", frames=9, num_inference_steps=4)
FORM = {"job": "demo", "prompt": "a cat", "steps": 4, "guidance": 4.0, "seed": 1}


def png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 30)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def fields(refused: pytest.ExceptionInfo[Refused]) -> list[str]:
    return [p.field for p in refused.value.problems]


def test_the_job_s_sizes_and_the_form_s_settings_make_the_sampler_settings() -> None:
    spec = settings(parse_form({**FORM, "sampler": "distilled", "negative_prompt": "blur"}), JOB)
    assert (spec.resolution, spec.frames, spec.num_inference_steps, spec.sampler, spec.negative_prompt) == (
        "64x112", 9, 4, "distilled", "blur")


@pytest.mark.parametrize(("change", "field"), [
    ({"steps": 0}, "steps"), ({"guidance": 0.5}, "guidance"), ({"seed": -1}, "seed"),
])
def test_values_the_job_api_refuses_are_named_by_the_form_s_field(change: dict, field: str) -> None:
    with pytest.raises(Refused) as refused:
        settings(parse_form({**FORM, **change}), JOB)
    assert fields(refused) == [field]


@pytest.mark.parametrize(("change", "field"), [
    ({"prompt": ""}, "prompt"), ({"sampler": "fast"}, "sampler"), ({"lora_strength": 3}, "lora_strength"),
    ({"steps": "many"}, "steps"),
])
def test_a_malformed_form_is_refused_naming_the_field(change: dict, field: str) -> None:
    with pytest.raises(Refused) as refused:
        parse_form({**FORM, **change})
    assert fields(refused) == [field]


def test_an_upload_must_decode_as_an_image_big_enough_to_scale() -> None:
    assert uploaded_image(png(120, 70))[:4] == b"\x89PNG"
    for bad, words in ((base64.b64encode(b"text").decode(), "cannot be decoded"), ("%%%", "not base64"),
                       (png(MIN_SIDE - 1, 70), f"at least {MIN_SIDE} px")):
        with pytest.raises(Refused) as refused:
            uploaded_image(bad)
        assert fields(refused) == ["image"] and words in str(refused.value)
