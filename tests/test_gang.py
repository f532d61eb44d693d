"""The gang's objects as data: what one job spec becomes, without a cluster."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from longcat_job.parse import parse_job
from longcat_operator import gang
from longcat_operator.settings import OperatorSettings
from tests.invalid_jobs import MINIMAL, ROOT

OWNER = {"apiVersion": "longcat.video/v1alpha1", "kind": "LongCatI2VJob",
         "metadata": {"name": "minimal", "uid": "0f6f0c1e-0000-4000-8000-000000000001"}}
SETTINGS = OperatorSettings(trainer_image="registry.local/trainer:1", default_s3_endpoint="http://s3.local:8333",
                            gpu_resource="nvidia.com/gpu")


def _job(**resources):
    doc = copy.deepcopy(MINIMAL)
    doc["metadata"]["namespace"] = "team-a"
    doc["spec"]["resources"] = resources
    return parse_job(doc)


def test_single_node_job_talks_to_itself():
    job = _job()
    command = gang.torchrun_command(job, SETTINGS, attempt=0)
    assert "--master-addr=127.0.0.1" in command and "--nnodes=1" in command
    assert command[-4:] == ["-m", "longcat_trainer", "--config", "/etc/longcat/job.json"]


def test_multi_node_gang():
    job = parse_job(yaml.safe_load((ROOT / "examples" / "multi-node.yaml").read_text()))
    job.metadata.namespace = "team-a"
    k8s_job = gang.indexed_job(job, SETTINGS, OWNER, attempt=3)
    spec = k8s_job["spec"]
    assert k8s_job["metadata"]["name"] == "multi-node-a3"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == ("Indexed", 2, 2, 0)
    assert spec["suspend"] is False
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert "--master-addr=multi-node-a3-0.lcj-multi-node" in container["command"]
    assert "--nproc-per-node=8" in container["command"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "training"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert spec["template"]["metadata"]["labels"][gang.LABEL_ATTEMPT] == "3"


def test_kueue_job_is_created_suspended_with_the_queue_label():
    k8s_job = gang.indexed_job(_job(queueName="gpu-team-a"), SETTINGS, OWNER, attempt=0)
    assert k8s_job["metadata"]["labels"][gang.LABEL_QUEUE] == "gpu-team-a"
    assert k8s_job["spec"]["suspend"] is True
    plain = gang.indexed_job(_job(), SETTINGS, OWNER, attempt=0)
    assert gang.LABEL_QUEUE not in plain["metadata"]["labels"] and plain["spec"]["suspend"] is False


def test_config_map_holds_the_resolved_job_and_no_credentials():
    cm = gang.config_map(_job(), SETTINGS, OWNER)
    text = cm["data"][gang.CONFIG_KEY]
    resolved = parse_job(json.loads(text))
    assert resolved.spec.output.s3.endpoint == "http://s3.local:8333"
    assert resolved.spec.lora.rank == 8 and resolved.status is None
    assert "AWS_SECRET_ACCESS_KEY" not in text
    assert cm["metadata"]["ownerReferences"][0]["uid"] == OWNER["metadata"]["uid"]


def test_credentials_come_from_the_secret_as_environment():
    container = gang.indexed_job(_job(), SETTINGS, OWNER, 0)["spec"]["template"]["spec"]["containers"][0]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert refs == {"AWS_ACCESS_KEY_ID": "s3-credentials", "AWS_SECRET_ACCESS_KEY": "s3-credentials"}
    assert container["image"] == "registry.local/trainer:1"


def test_two_secrets_in_one_job_are_refused_by_name():
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["output"]["s3"]["credentialsSecret"] = "other-secret"
    with pytest.raises(gang.GangError, match="other-secret, s3-credentials"):
        gang.credentials_secret(parse_job(doc))


def test_local_locations_are_named():
    doc = copy.deepcopy(MINIMAL)
    doc["spec"]["output"] = {"local": {"path": "/out"}}
    assert gang.local_locations(parse_job(doc)) == ["spec.output.local"]
    assert gang.local_locations(_job()) == []


def test_service_is_headless_and_publishes_unready_pods():
    svc = gang.service(_job(), SETTINGS, OWNER)
    assert svc["metadata"]["name"] == "lcj-minimal"
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {gang.LABEL_JOB: "minimal"}


def test_a_model_cache_claim_is_mounted_where_the_trainer_keeps_models():
    pod = gang.indexed_job(_job(modelCache={"claimName": "longcat-models"}), SETTINGS, OWNER, 0)["spec"]["template"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"] == {"claimName": "longcat-models"}
    container = pod["spec"]["containers"][0]
    assert {"name": "model-cache", "mountPath": gang.MODEL_CACHE_DIR} in container["volumeMounts"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LONGCAT_MODEL_CACHE"] == gang.MODEL_CACHE_DIR
    assert env["HF_HUB_CACHE"].startswith(gang.MODEL_CACHE_DIR)
    without = gang.indexed_job(_job(), SETTINGS, OWNER, 0)["spec"]["template"]["spec"]
    assert "model-cache" not in {v["name"] for v in without["volumes"]}  # then each attempt downloads to /tmp

