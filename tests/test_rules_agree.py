"""One set of rules: `longcat-i2v validate` (the same parse the webhook and the operator run) judges every job
document as the real API server does, and names the same field.

Hypothesis generates documents around the valid examples (values replaced by values of other kinds and sizes,
fields removed, renamed to snake_case or misspelt, fields added) and each goes to the API server as a
server-side dry run with strict field validation. The verdicts must agree, and a refusal must name a field that
the other side names too (or one inside it: the offline check can point at the exact list entry).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from longcat_job.api import GROUP, PLURAL, VERSION
from longcat_job.parse import InvalidJob, parse_job
from tests.fixtures.cluster import Cluster

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
SEEDS = [yaml.safe_load(path.read_text()) for path in sorted((ROOT / "examples").glob("*.yaml"))]
EXAMPLES = 500
# Paths the mutations leave alone: which resource it is, and metadata the API server owns.
FIXED = {("apiVersion",), ("kind",), ("metadata",), ("metadata", "namespace")}


def leaves(node: Any, path: tuple = ()) -> list[tuple]:
    """Every path below `node` (dict keys and list indices), the containers included."""
    found = [path] if path else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += leaves(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += leaves(value, (*path, index))
    return [p for p in found if p not in FIXED]


def parent(doc: dict, path: tuple) -> Any:
    node = doc
    for part in path[:-1]:
        node = node[part]
    return node


def snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


VALUES = st.one_of(
    st.integers(min_value=-(2**40), max_value=2**40), st.sampled_from([0, 1, 5, 9, 16, 17, 93, 1025, 1026, 4096]),
    st.floats(allow_nan=False, allow_infinity=False, width=32), st.booleans(),
    st.text(max_size=12), st.sampled_from(["", "480x832", "99984x99984", "a..b", "192.168.1.1", "s3://x",
                                           "clips//", "../x", "UPPER", "video", "conditioning", "textfile"]),
    st.lists(st.integers(min_value=0, max_value=9), max_size=2), st.just({}), st.none(),
)


@st.composite
def documents(draw: st.DrawFn) -> dict:
    doc = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = leaves(doc)
        if not paths:  # every field replaced by a scalar already
            break
        path = draw(st.sampled_from(paths))
        container, key = parent(doc, path), path[-1]
        action = draw(st.sampled_from(["replace", "replace", "remove", "rename", "add"]))
        if action == "replace":
            container[key] = draw(VALUES)
        elif action == "remove" and isinstance(key, str):
            del container[key]
        elif action == "rename" and isinstance(key, str):
            new = draw(st.sampled_from([snake(key), key.lower(), key + "s", key[:-1] or "x"]))
            if new != key and new not in container:
                container[new] = container.pop(key)
        elif action == "add" and isinstance(container, dict):
            container[draw(st.sampled_from(["extra", "learning_rate", "maxSteps", "frames", "id"]))] = draw(VALUES)
    return doc


def as_kubectl_sends(value: Any) -> Any:
    """kubectl re-encodes a document through Go's JSON, which writes a whole-number float as an integer (1.0 -> 1)."""
    if isinstance(value, dict):
        return {k: as_kubectl_sends(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_kubectl_sends(v) for v in value]
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**63 else value


def api_verdict(api: client.CustomObjectsApi, namespace: str, doc: dict) -> set[str] | None:
    """None when the API server accepts the document as `kubectl apply` sends it; else the fields its refusal
    names."""
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, as_kubectl_sends(doc), dry_run="All",
                                            field_validation="Strict")
        return None
    except ApiException as exc:
        if exc.status not in (400, 422):
            raise
        body = json.loads(exc.body)
        fields = {cause.get("field", "") for cause in (body.get("details") or {}).get("causes", [])}
        fields |= set(re.findall(r'unknown field "([^"]+)"', body.get("message", "")))
        # A document that does not decode (a name that is no string) names the Go field: ObjectMeta is metadata.
        fields |= {m.replace("ObjectMeta.", "metadata.") for m in re.findall(r"Go struct field ([\w.]+)", body.get("message", ""))}
        return {f.removeprefix(".") for f in fields if f} or {"(document)"}


def our_verdict(doc: dict) -> set[str] | None:
    try:
        parse_job(copy.deepcopy(doc))
        return None
    except InvalidJob as exc:
        return {error.path for error in exc.errors}


def related(a: str, b: str) -> bool:
    """The same field, or one inside the other ('spec.datasets' and 'spec.datasets[1].conditioningData[0]')."""
    short, long = sorted((a, b), key=len)
    return long == short or long.startswith((short + ".", short + "["))


@pytest.fixture(scope="module")
def custom_objects(crd_installed: Cluster) -> client.CustomObjectsApi:
    configuration = client.Configuration()
    config.load_kube_config(config_file=str(crd_installed.kubeconfig), client_configuration=configuration)
    return client.CustomObjectsApi(client.ApiClient(configuration))


def test_validate_and_the_api_server_judge_every_document_alike(custom_objects, namespace: str) -> None:
    seen = {"accepted": 0, "refused": 0}

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(documents())
    def agree(doc: dict) -> None:
        theirs, ours = api_verdict(custom_objects, namespace, doc), our_verdict(doc)
        assert (theirs is None) == (ours is None), f"API server: {theirs}, validate: {ours}, document:\n{doc}"
        if theirs is not None:
            assert any(related(a, b) for a in theirs for b in ours), (
                f"they name different fields: API server {sorted(theirs)}, validate {sorted(ours)}; document:\n{doc}")
        seen["refused" if theirs else "accepted"] += 1

    agree()
    assert seen["accepted"] + seen["refused"] >= EXAMPLES and seen["accepted"] > 20 and seen["refused"] > 100, seen
