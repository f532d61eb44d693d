"""The job API offline: defaults equal the seed's, every malformed job is refused with its field path."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from longcat_job.api import DEFAULT_LORA_TARGETS
from longcat_job.parse import InvalidJob, load_job, parse_job
from tests.invalid_jobs import CASES, MINIMAL, ROOT, Case

CLI = [sys.executable, "-m", "longcat_operator.cli"]


def test_minimal_job_gets_the_seed_defaults():
    job = parse_job(copy.deepcopy(MINIMAL))
    spec = job.spec
    assert (spec.model.family, spec.model.flavour, spec.model.type) == ("longcat_video", "final", "lora")
    assert spec.lora.rank == 8 and spec.lora.targets == DEFAULT_LORA_TARGETS
    assert spec.training.batch_size == 1
    assert spec.training.gradient_checkpointing is True
    assert spec.training.learning_rate == 1e-4
    assert spec.training.flow_shift == 12.0
    assert spec.aspect_bucket_alignment == 64
    assert [d.frames for d in spec.datasets] == [93, 93]
    v = spec.validation
    assert (v.resolution, v.frames, v.num_inference_steps, v.guidance) == ("480x832", 93, 40, 4.0)
    assert v.using_datasets is True and v.eval_dataset_id is None
    assert (spec.resources.nodes, spec.resources.gpus_per_node, spec.max_restarts, spec.suspend) == (1, 1, 3, False)


def test_camel_case_round_trip():
    job = parse_job(copy.deepcopy(MINIMAL))
    dumped = job.model_dump(by_alias=True, exclude_none=True)
    assert dumped["spec"]["datasets"][0]["isI2V"] is True
    assert dumped["spec"]["datasets"][0]["conditioningData"] == ["start-frames"]
    assert parse_job(dumped) == job


@pytest.mark.parametrize("resolution", ["832x480", "480x832", "512x512", "1024x576"])
def test_valid_validation_resolutions(resolution):
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["validation"] = {"resolution": resolution}
    assert parse_job(doc).spec.validation.resolution == resolution


def test_catalogue_is_large_and_distinct():
    assert len(CASES) >= 40
    assert len({case.name for case in CASES}) == len(CASES)
    assert len({(case.path, case.text) for case in CASES}) >= 30


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_malformed_job_is_refused_with_its_field_path(case: Case):
    with pytest.raises(InvalidJob) as refused:
        parse_job(case.document())
    messages = [str(error) for error in refused.value.errors]
    assert any(m.startswith(f"{case.path}: ") and case.text in m for m in messages), messages


def test_all_problems_are_reported_at_once():
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["datasets"][0]["frames"] = 92
    doc["spec"]["lora"] = {"rank": 0}
    doc["spec"]["resources"] = {"nodes": 0}
    with pytest.raises(InvalidJob) as refused:
        parse_job(doc)
    paths = {error.path for error in refused.value.errors}
    assert {"spec.datasets[0].frames", "spec.lora.rank", "spec.resources.nodes"} <= paths


def test_float_in_exponent_notation_is_a_number(tmp_path: Path):
    doc = copy.deepcopy(MINIMAL)
    text = yaml.safe_dump(doc)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(text.replace("spec:\n", "spec:\n  training: {learningRate: 3e-5}\n", 1))
    assert load_job(job_file).spec.training.learning_rate == 3e-5


def test_examples_are_valid():
    examples = sorted((ROOT / "examples").glob("*.yaml"))
    assert len(examples) >= 4
    result = subprocess.run([*CLI, "validate", *map(str, examples)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": valid: ") == len(examples)


def _expectations(path: Path) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in path.read_text().splitlines() if line.startswith("# expect:")]


@pytest.mark.parametrize("example", sorted((ROOT / "examples" / "invalid").glob("*.yaml")), ids=lambda p: p.stem)
def test_invalid_examples_fail_with_their_documented_error(example: Path):
    expected = _expectations(example)
    assert expected, f"{example} documents no '# expect:' line"
    result = subprocess.run([*CLI, "validate", str(example)], capture_output=True, text=True)
    assert result.returncode == 1
    for text in expected:
        assert text in result.stderr, result.stderr


def test_validate_reports_unreadable_yaml(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec:\n  datasets: [\n")
    result = subprocess.run([*CLI, "validate", str(broken)], capture_output=True, text=True)
    assert result.returncode == 1
    assert f"{broken}: (document): not valid YAML at line" in result.stderr


def test_api_does_not_import_torch():
    code = "import sys, longcat_job.api, longcat_operator.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_operator_folder_does_not_shadow_the_standard_library():
    subprocess.run([sys.executable, "-c", "import operator; operator.add(1, 2)"], check=True, cwd=ROOT)

