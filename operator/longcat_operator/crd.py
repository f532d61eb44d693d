"""Generates the LongCatI2VJob CustomResourceDefinition from the pydantic API models.

Kubernetes wants a structural OpenAPI v3.0 schema: every node typed, no $ref, no anyOf for optionals,
`exclusiveMinimum` as a flag. This module rewrites pydantic's JSON Schema (2020-12) into that form and keeps the
CEL rules the models carry. Run `python -m longcat_operator.crd > crds/longcat.video_longcati2vjobs.yaml`
(`scripts/gen-crd` does it for the repo and the chart); a test fails when the committed file is stale.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from longcat_job import api
from longcat_job.rules import CEL_KEY

CRD_FILE_NAME = f"{api.GROUP}_{api.PLURAL}.yaml"

# Keys of JSON Schema that carry over unchanged into the CRD's OpenAPI v3.0 schema.
_KEPT = {
    "type", "description", "enum", "format", "pattern", "minimum", "maximum", "minLength", "maxLength",
    "minItems", "maxItems", "maxProperties", "required", "default", "exclusiveMinimum", "exclusiveMaximum", CEL_KEY,
}


def _structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One JSON Schema node rewritten as a structural OpenAPI v3.0 node."""
    node = copy.deepcopy(node)
    for combinator in ("allOf", "anyOf"):
        if combinator in node:
            options = [option for option in node.pop(combinator) if option.get("type") != "null"]
            if len(options) != 1:
                raise ValueError(f"cannot express {combinator} of {len(options)} schemas structurally: {options}")
            inner = options[0]
            # Rules written at the use site (e.g. immutability) apply on top of the referenced type's own.
            rules = inner.get("x-kubernetes-validations", []) + node.pop("x-kubernetes-validations", [])
            node = {**inner, **node}
            if rules:
                node["x-kubernetes-validations"] = rules
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        rules = target.get("x-kubernetes-validations", []) + node.pop("x-kubernetes-validations", [])
        node = {**copy.deepcopy(target), **node}
        if rules:
            node["x-kubernetes-validations"] = rules
        return _structural(node, defs)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound, flag_of in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in node:
            node[flag_of] = node.pop(bound)
            node[bound] = True
    if node.get("default", 0) is None:
        del node["default"]

    out = {key: value for key, value in node.items() if key in _KEPT}
    if "properties" in node:
        out["type"] = "object"
        required = set(node.get("required", []))
        properties = {}
        for name, child in node["properties"].items():
            optional_object = _is_optional(child)
            prop = _structural(child, defs)
            # A default of {} lets the API server fill nested defaults when the user leaves the section out.
            if prop.get("type") == "object" and name not in required and "default" not in prop and not optional_object:
                prop["default"] = {}
            properties[name] = prop
        out["properties"] = properties
    if "items" in node:
        out["items"] = _structural(node["items"], defs)
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], defs)
    if out.get("required") == []:
        del out["required"]
    return out


def _is_optional(node: dict[str, Any]) -> bool:
    return any(option.get("type") == "null" for option in node.get("anyOf", []))


def _schema(model: type) -> dict[str, Any]:
    json_schema = api.resource_schema(model)
    return _structural(json_schema, json_schema.get("$defs", {}))


def _status_schema() -> dict[str, Any]:
    status = _schema(api.JobStatus)
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    return status


def build_crd() -> dict[str, Any]:
    root = {
        "type": "object",
        "description": "A LoRA fine-tuning job for LongCat-Video in image-to-video mode.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            # Declared so that the rules below can name it (a CRD may describe metadata.name and generateName).
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
            "spec": _schema(api.JobSpec),
            "status": _status_schema(),
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {api.MAX_JOB_NAME}",
                "fieldPath": ".metadata.name",
                "message": f"metadata.name must be at most {api.MAX_JOB_NAME} characters: the Job, Service and pod "
                "names derived from it must fit 63",
            },
            {
                "rule": f"self.metadata.name.matches('{api.JOB_NAME_PATTERN}')",
                "fieldPath": ".metadata.name",
                "message": "metadata.name must be lowercase letters, digits and '-' (no dots): the Service and pod "
                "names derived from it are DNS labels",
            },
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": [api.SHORT_NAME],
                "categories": ["all", "longcat"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Step", "type": "string", "jsonPath": ".status.progress.stepDisplay"},
                        {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
                        {"name": "ETA", "type": "string", "jsonPath": ".status.progress.etaDisplay"},
                        {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd() -> str:
    header = "# Generated from operator/longcat_operator/api.py by scripts/gen-crd: do not edit by hand.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render_crd())
