"""The chart's optional UI (`ui.enabled`): what it renders, and the RBAC its ServiceAccount gets from the real
authorizer: read-only LongCatI2VJobs, nothing else; S3 keys only as Secret references."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from tests.fixtures.cluster import Cluster
from tests.fixtures.helm import CHART, Helm

UI = ["--set", "ui.enabled=true", "--set", "ui.s3CredentialsSecret=s3-credentials"]


def ui_objects(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "ui"}


def test_ui_is_off_by_default_and_renders_a_read_only_non_root_server(helm: Helm) -> None:
    assert ui_objects(helm.template()) == {}
    docs = helm.template(*UI)
    ui = ui_objects(docs)
    assert sorted(ui) == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    assert ui["ClusterRole"]["rules"] == [{"apiGroups": ["longcat.video"], "resources": ["longcati2vjobs"],
                                           "verbs": ["get", "list", "watch"]}]
    assert ui["ClusterRoleBinding"]["subjects"][0]["name"] == ui["ServiceAccount"]["metadata"]["name"]
    assert ui["Service"]["spec"]["type"] == "ClusterIP"
    pod = ui["Deployment"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == ui["ServiceAccount"]["metadata"]["name"] == "lc-longcat-operator-ui"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (main,) = pod["containers"]
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["image"] == "ghcr.io/longcat-i2v/trainer:0.1.0"  # holds the server and the trainer
    assert main["command"] == ["python", "-m", "longcat_ui"] and "--host=0.0.0.0" in main["args"]
    # Credentials as references to the jobs' Secret, never as values (nor in any ConfigMap).
    env = {e["name"]: e for e in main["env"]}
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert env[key] == {"name": key, "valueFrom": {"secretKeyRef": {"name": "s3-credentials", "key": key}}}
    assert not any("AWS_SECRET" in json.dumps(d) for d in docs if d["kind"] == "ConfigMap")
    # No GPU by default: none asked for, none visible; the preview page says it is disabled.
    assert "nvidia.com/gpu" not in json.dumps(main["resources"]) and env["CUDA_VISIBLE_DEVICES"]["value"] == ""
    # The operator's Deployment and Service select their own pods, not the UI's (and the UI's not theirs).
    operator = next(d for d in docs if d["kind"] == "Deployment" and d is not ui["Deployment"])
    ui_labels = ui["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert not set(operator["spec"]["selector"]["matchLabels"].items()) <= set(ui_labels.items())
    assert set(ui["Service"]["spec"]["selector"].items()) <= set(ui_labels.items())


def test_ui_gpu_gives_the_preview_a_gpu(helm: Helm) -> None:
    ui = ui_objects(helm.template(*UI, "--set", "ui.gpu=1", "--set", "trainer.gpuResource=amd.com/gpu",
                                  "--set", "ui.output=s3://loras/team-a"))
    (main,) = ui["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert main["resources"]["limits"]["amd.com/gpu"] == 1
    assert "CUDA_VISIBLE_DEVICES" not in {e["name"] for e in main["env"]}
    assert "--output=s3://loras/team-a" in main["args"]


@pytest.mark.parametrize(("value", "field"), [("ui.gpu=-1", "gpu"), ("ui.output=/data", "output")])
def test_schema_rejects_wrong_ui_values(helm: Helm, value: str, field: str) -> None:
    result = helm("template", "lc", str(CHART), "--set", value, check=False)
    assert result.returncode != 0 and field in result.stderr


@pytest.mark.cluster
def test_ui_service_account_may_read_jobs_everywhere_and_nothing_else(cluster: Cluster, helm: Helm,
                                                                      namespace: str) -> None:
    from tests.test_chart import can  # noqa: PLC0415 - the same `kubectl auth can-i` as the operator's checks

    release = f"ui{uuid.uuid4().hex[:6]}"
    bound = helm.on(cluster)
    bound("install", release, str(CHART), "--namespace", namespace, *UI, "--set", "ui.gpu=1")
    try:
        account = f"system:serviceaccount:{namespace}:{release}-longcat-operator-ui"
        for verb in ("get", "list", "watch"):
            assert can(cluster, account, verb, "longcati2vjobs.longcat.video", None), verb
            assert can(cluster, account, verb, "longcati2vjobs.longcat.video", "default"), verb
        for verb, resource in (("patch", "longcati2vjobs.longcat.video"), ("create", "longcati2vjobs.longcat.video"),
                               ("delete", "longcati2vjobs.longcat.video"), ("get", "secrets"), ("list", "pods"),
                               ("create", "jobs.batch")):
            assert not can(cluster, account, verb, resource, namespace), f"{verb} {resource}"
        deployment = json.loads(cluster.kubectl("get", "deployment", f"{release}-longcat-operator-ui", "-n", namespace,
                                                "-o", "json").stdout)
        assert deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        cluster.kubectl("get", "service", f"{release}-longcat-operator-ui", "-n", namespace)
    finally:
        bound("uninstall", release, "--namespace", namespace, check=False)

