"""The same catalogue of malformed jobs, refused by the real API server through the CRD's schema and CEL rules."""

from __future__ import annotations

import json

import pytest

from tests.invalid_jobs import CASES, MINIMAL, Case

pytestmark = pytest.mark.cluster


def _server_dry_run(cluster, namespace: str, document: dict) -> tuple[int, str]:
    result = cluster.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                             input=json.dumps(document), check=False)
    return result.returncode, result.stdout + result.stderr


def test_minimal_job_is_accepted_and_defaulted(crd_installed, namespace):
    result = crd_installed.kubectl("apply", "--dry-run=server", "-n", namespace, "-o", "json", "-f", "-",
                                   input=json.dumps(MINIMAL))
    spec = json.loads(result.stdout)["spec"]
    assert spec["lora"]["rank"] == 8 and spec["training"]["flowShift"] == 12.0
    assert spec["validation"] == {**spec["validation"], "resolution": "480x832", "frames": 93,
                                  "numInferenceSteps": 40, "guidance": 4.0}
    assert spec["datasets"][0]["frames"] == 93 and spec["aspectBucketAlignment"] == 64


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_api_server_refuses_malformed_job(crd_installed, namespace, case: Case):
    code, output = _server_dry_run(crd_installed, namespace, case.document())
    assert code != 0, f"the API server accepted {case.name}"
    assert case.expected_api_path in output, output
    if case.expected_api_text is not None:
        assert case.expected_api_text in output, output
