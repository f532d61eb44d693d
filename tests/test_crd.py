"""The committed CRD is the one the API models generate, and it is a structural schema."""

from __future__ import annotations

from typing import Any

import yaml

from longcat_operator.crd import CRD_FILE_NAME, render_crd
from tests.invalid_jobs import ROOT

COMMITTED = ROOT / "crds" / CRD_FILE_NAME
IN_CHART = ROOT / "charts" / "longcat-operator" / "crds" / CRD_FILE_NAME


def test_committed_crd_is_generated_from_the_models():
    assert COMMITTED.read_text() == render_crd(), "crds/ is stale: run scripts/gen-crd"


def test_chart_ships_the_same_crd():
    assert IN_CHART.read_bytes() == COMMITTED.read_bytes(), "the chart's CRD is stale: run scripts/gen-crd"


def _walk(node: dict[str, Any], path: str):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in node:
        yield from _walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _walk(node["additionalProperties"], f"{path}{{}}")


def _schema() -> dict[str, Any]:
    crd = yaml.safe_load(COMMITTED.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_schema_is_structural():
    for path, node in _walk(_schema(), ""):
        assert "type" in node or path == "", f"{path} has no type"
        for forbidden in ("$ref", "anyOf", "allOf", "oneOf", "const", "title", "nullable"):
            assert forbidden not in node, f"{path} carries {forbidden}"
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path


def test_strings_and_lists_have_bounds_for_cel_cost():
    # Without maxLength/maxItems the API server estimates unbounded CEL cost and refuses the CRD.
    for path, node in _walk(_schema()["properties"]["spec"], "spec"):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, f"{path} is an unbounded string"
        if node.get("type") == "array":
            assert "maxItems" in node, f"{path} is an unbounded list"


def test_defaults_and_rules_reach_the_crd():
    spec = _schema()["properties"]["spec"]["properties"]
    assert spec["lora"]["properties"]["rank"]["default"] == 8
    assert spec["training"]["properties"]["flowShift"]["default"] == 12.0
    assert spec["validation"]["properties"]["resolution"]["default"] == "480x832"
    assert spec["aspectBucketAlignment"]["default"] == 64
    frames = spec["datasets"]["items"]["properties"]["frames"]
    assert frames["default"] == 93
    assert frames["x-kubernetes-validations"][0]["rule"] == "(self - 1) % 4 == 0"
    for immutable in ("model", "datasets", "output"):
        rules = [rule["rule"] for rule in spec[immutable]["x-kubernetes-validations"]]
        assert "self == oldSelf" in rules, immutable
