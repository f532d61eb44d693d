"""The operator against the real control plane and the real S3 server.

There is no kubelet: tests play its part by patching pod status (Running, Failed with an exit code, Succeeded),
and the real Job controller turns that into Job conditions the operator reacts to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from longcat_operator.api import Artifacts, Progress
from longcat_operator.manifests import LABEL_ATTEMPT, LABEL_JOB
from longcat_operator.progress import EXIT_CONFIG_ERROR, PROGRESS_KEY, TrainerProgress
from tests.fixtures.cluster import Cluster
from tests.fixtures.operator import get_json, running_operator, s3_secret, wait_for
from tests.fixtures.s3 import S3Server, put_objects

pytestmark = [pytest.mark.cluster, pytest.mark.s3]
SECRET = "s3-credentials"
STEMS = ["beach", "city", "forest"]


def _dataset(s3: S3Server, bucket: str, stems: list[str], start_frames: list[str] | None = None) -> None:
    objects = {f"clips/{stem}.mp4": b"\x00\x00\x00\x18ftypmp42" + bytes(64) for stem in stems}
    objects |= {f"clips/{stem}.txt": f"a {stem} at dusk".encode() for stem in stems}
    objects |= {f"frames/{stem}.png": b"\x89PNG\r\n\x1a\n" + bytes(32) for stem in (start_frames or stems)}
    put_objects(s3.client(), bucket, objects)


def _credentials_and_data(cluster: Cluster, namespace: str, s3: S3Server, bucket: str,
                          start_frames: list[str] | None = None) -> None:
    """The job's credentials Secret and a paired dataset of STEMS (start frames only for `start_frames`)."""
    creds = s3.credentials
    s3_secret(cluster, namespace, SECRET, creds.access_key_id, creds.secret_access_key.get_secret_value())
    _dataset(s3, bucket, STEMS, start_frames)


def _job(name: str, s3: S3Server, bucket: str, nodes: int = 2, **spec: Any) -> dict[str, Any]:
    def where(prefix: str) -> dict[str, Any]:
        return {"s3": {"bucket": bucket, "prefix": prefix, "endpoint": s3.endpoint, "credentialsSecret": SECRET}}

    return {
        "apiVersion": "longcat.video/v1alpha1",
        "kind": "LongCatI2VJob",
        "metadata": {"name": name},
        "spec": {
            "datasets": [
                {"id": "clips", "type": "video", "isI2V": True, "captionStrategy": "textfile",
                 "source": where("clips/"), "conditioningData": ["frames"]},
                {"id": "frames", "type": "conditioning", "source": where("frames/")},
            ],
            "output": where(f"out/{name}/"),
            "training": {"maxSteps": 10},
            "resources": {"nodes": nodes, "gpusPerNode": 2, "queueName": None} if nodes else {},
            "maxRestarts": 1,
            **spec,
        },
    }


def _apply(cluster: Cluster, namespace: str, job: dict[str, Any]) -> None:
    job = json.loads(json.dumps(job))
    job["spec"]["resources"] = {k: v for k, v in job["spec"].get("resources", {}).items() if v is not None}
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))


def _status(cluster: Cluster, namespace: str, name: str) -> dict[str, Any]:
    obj = get_json(cluster, "-n", namespace, "lcj", name)
    return (obj or {}).get("status", {})


def _phase_is(cluster: Cluster, namespace: str, name: str, phase: str):
    return lambda: _status(cluster, namespace, name) if _status(cluster, namespace, name).get("phase") == phase else None


def _pods(cluster: Cluster, namespace: str, name: str, attempt: int) -> list[dict[str, Any]]:
    pods = get_json(cluster, "-n", namespace, "pods", "-l", f"{LABEL_JOB}={name},{LABEL_ATTEMPT}={attempt}")
    return pods["items"] if pods else []


def _set_pod(cluster: Cluster, namespace: str, pod: str, phase: str, exit_code: int | None = None) -> None:
    status: dict[str, Any] = {"phase": phase}
    if exit_code is not None:
        terminated = {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed",
                      "message": "spec.datasets[0]: 3 of 3 samples unreadable" if exit_code == EXIT_CONFIG_ERROR else ""}
        status["containerStatuses"] = [{"name": "trainer", "image": "trainer", "imageID": "", "ready": False,
                                        "restartCount": 0, "state": {"terminated": terminated}}]
    cluster.kubectl("patch", "pod", pod, "-n", namespace, "--subresource=status", "--type=merge",
                    "-p", json.dumps({"status": status}))


def _write_progress(s3: S3Server, bucket: str, name: str, phase: str, step: int, lora: str | None = None) -> None:
    progress = TrainerProgress(
        phase=phase, progress=Progress(step=step, max_steps=10, loss=0.25, learning_rate=1e-4),
        artifacts=Artifacts(lora=lora), updated="2026-11-25T12:00:00Z",
    )
    s3.client().put_object(Bucket=bucket, Key=f"out/{name}/{PROGRESS_KEY}", Body=progress.to_json())


def test_job_runs_fails_restarts_and_succeeds(cluster, operator, namespace, s3_server, s3_bucket):
    secret_value = s3_server.credentials.secret_access_key.get_secret_value()
    _credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    _apply(cluster, namespace, _job("train", s3_server, s3_bucket))

    status = wait_for("phase Launching", _phase_is(cluster, namespace, "train", "Launching"))
    assert {c["type"]: c["status"] for c in status["conditions"]} == {
        "Validated": "True", "DatasetReady": "True", "Launched": "True"}
    assert status["datasets"][0] == {"id": "clips", "objects": 6, "samples": 3, "problems": 0, "firstProblems": []}
    assert status["artifacts"]["manifest"] == f"s3://{s3_bucket}/out/train/manifest.json"

    config = get_json(cluster, "-n", namespace, "configmap", "train-config")
    assert json.loads(config["data"]["job.json"])["spec"]["output"]["s3"]["prefix"] == "out/train/"
    assert secret_value not in json.dumps(config)
    service = get_json(cluster, "-n", namespace, "service", "lcj-train")
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    job = get_json(cluster, "-n", namespace, "job", "train-a0")
    assert (job["spec"]["completionMode"], job["spec"]["parallelism"], job["spec"]["completions"]) == ("Indexed", 2, 2)
    pod_spec = job["spec"]["template"]["spec"]
    command = pod_spec["containers"][0]["command"]
    assert command[:3] == ["torchrun", "--nnodes=2", "--nproc-per-node=2"]
    assert "--master-addr=train-a0-0.lcj-train" in command and "--node-rank=$(JOB_COMPLETION_INDEX)" in command
    assert pod_spec["subdomain"] == "lcj-train" and pod_spec["automountServiceAccountToken"] is False
    env = {e["name"]: e for e in pod_spec["containers"][0]["env"]}
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": SECRET, "key": "AWS_SECRET_ACCESS_KEY", "optional": False}
    assert pod_spec["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert job["metadata"]["ownerReferences"][0]["kind"] == "LongCatI2VJob"

    pods = wait_for("2 pods of attempt 0", lambda: (p := _pods(cluster, namespace, "train", 0)) and len(p) == 2 and p)
    for pod in pods:
        _set_pod(cluster, namespace, pod["metadata"]["name"], "Running")
    _write_progress(s3_server, s3_bucket, "train", "Training", 4)
    status = wait_for("training progress", lambda: (s := _status(cluster, namespace, "train")).get(
        "progress", {}).get("step") == 4 and s.get("phase") == "Training" and s)
    assert status["progress"]["stepDisplay"] == "4/10" and status["progress"]["loss"] == 0.25
    table = cluster.kubectl("get", "lcj", "train", "-n", namespace).stdout
    assert "Training" in table and "4/10" in table and "0.25" in table

    _set_pod(cluster, namespace, pods[1]["metadata"]["name"], "Failed", exit_code=137)
    status = wait_for("a gang restart", lambda: (s := _status(cluster, namespace, "train")).get("restarts") == 1 and s)
    wait_for("attempt 0 deleted", lambda: get_json(cluster, "-n", namespace, "job", "train-a0") is None)
    assert get_json(cluster, "-n", namespace, "job", "train-a1") is not None

    pods = wait_for("pods of attempt 1", lambda: (p := _pods(cluster, namespace, "train", 1)) and len(p) == 2 and p)
    _write_progress(s3_server, s3_bucket, "train", "Succeeded", 10, lora=f"s3://{s3_bucket}/out/train/lora.safetensors")
    for pod in pods:
        _set_pod(cluster, namespace, pod["metadata"]["name"], "Succeeded", exit_code=0)
    status = wait_for("phase Succeeded", _phase_is(cluster, namespace, "train", "Succeeded"), timeout=90)
    assert status["artifacts"]["lora"] == f"s3://{s3_bucket}/out/train/lora.safetensors"
    assert status["progress"]["step"] == 10 and status["completionTime"]
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    for reason in ("Launched", "GangRestarted", "Succeeded"):
        assert f'"reason": "{reason}"' in events
    assert secret_value not in events and secret_value not in json.dumps(status)


def test_missing_start_frames_fail_before_any_pod(cluster, operator, namespace, s3_server, s3_bucket):
    _credentials_and_data(cluster, namespace, s3_server, s3_bucket, start_frames=["beach"])
    _apply(cluster, namespace, _job("nodata", s3_server, s3_bucket))
    status = wait_for("phase Failed", _phase_is(cluster, namespace, "nodata", "Failed"))
    ready = next(c for c in status["conditions"] if c["type"] == "DatasetReady")
    assert ready["status"] == "False" and ready["reason"] == "PreflightFailed"
    assert "city.mp4" in ready["message"] and "forest.mp4" in ready["message"] and "beach" not in ready["message"]
    assert get_json(cluster, "-n", namespace, "jobs")["items"] == []


def test_bad_input_exit_code_fails_without_restart(cluster, operator, namespace, s3_server, s3_bucket):
    _credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    _apply(cluster, namespace, _job("badinput", s3_server, s3_bucket, nodes=1))
    wait_for("phase Launching", _phase_is(cluster, namespace, "badinput", "Launching"))
    pod = wait_for("the pod", lambda: _pods(cluster, namespace, "badinput", 0))[0]
    _set_pod(cluster, namespace, pod["metadata"]["name"], "Failed", exit_code=EXIT_CONFIG_ERROR)
    status = wait_for("phase Failed", _phase_is(cluster, namespace, "badinput", "Failed"))
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BadInput" and "samples unreadable" in failed["message"]
    assert status.get("restarts", 0) == 0


def test_trainer_reported_config_error_fails_without_restart(cluster, operator, namespace, s3_server, s3_bucket):
    # Under torchrun the pod exits 1 whatever the trainer meant; progress.json says it was the configuration.
    _credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    _apply(cluster, namespace, _job("badconfig", s3_server, s3_bucket, nodes=1))
    wait_for("phase Launching", _phase_is(cluster, namespace, "badconfig", "Launching"))
    pod = wait_for("the pod", lambda: _pods(cluster, namespace, "badconfig", 0))[0]
    failed = TrainerProgress(phase="Failed", failure={"reason": "InvalidConfig",
                             "message": "model source hf://nobody/nothing: repository not found"},
                             updated="2026-11-25T12:00:00Z")
    s3_server.client().put_object(Bucket=s3_bucket, Key=f"out/badconfig/{PROGRESS_KEY}", Body=failed.to_json())
    _set_pod(cluster, namespace, pod["metadata"]["name"], "Failed", exit_code=1)
    status = wait_for("phase Failed", _phase_is(cluster, namespace, "badconfig", "Failed"))
    condition = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "InvalidConfig" and "repository not found" in condition["message"]
    assert status.get("restarts", 0) == 0


def test_local_directories_are_refused_in_a_cluster(cluster, operator, namespace, s3_server, s3_bucket):
    job = _job("local", s3_server, s3_bucket)
    job["spec"]["output"] = {"local": {"path": "/output"}}
    _apply(cluster, namespace, job)
    status = wait_for("phase Failed", _phase_is(cluster, namespace, "local", "Failed"))
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert validated["reason"] == "LocalLocation"
    assert "spec.output.local" in validated["message"] and "longcat-i2v run" in validated["message"]


def test_suspend_resume_and_delete(cluster, operator, namespace, s3_server, s3_bucket):
    _credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    _apply(cluster, namespace, _job("pause", s3_server, s3_bucket, nodes=1))
    wait_for("phase Launching", _phase_is(cluster, namespace, "pause", "Launching"))
    cluster.kubectl("patch", "lcj", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for("the Job suspended", lambda: get_json(cluster, "-n", namespace, "job", "pause-a0")["spec"]["suspend"])
    wait_for("phase Suspended", _phase_is(cluster, namespace, "pause", "Suspended"))
    cluster.kubectl("patch", "lcj", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for("the Job resumed", lambda: not get_json(cluster, "-n", namespace, "job", "pause-a0")["spec"]["suspend"])

    cluster.kubectl("delete", "lcj", "pause", "-n", namespace)
    for kind, name in (("job", "pause-a0"), ("service", "lcj-pause"), ("configmap", "pause-config")):
        wait_for(f"{kind} {name} garbage-collected", lambda: get_json(cluster, "-n", namespace, kind, name) is None)
    assert s3_server.client().head_object(Bucket=s3_bucket, Key="out/pause/manifest.json")


def test_operator_restart_during_launch_makes_one_job(cluster, crd_installed, namespace, s3_server, s3_bucket):
    _credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    with running_operator(cluster, namespace):
        _apply(cluster, namespace, _job("twice", s3_server, s3_bucket, nodes=1))
        wait_for("validation started", lambda: _status(cluster, namespace, "twice").get("phase"), interval=0.05)
    with running_operator(cluster, namespace) as runner:
        wait_for("phase Launching", _phase_is(cluster, namespace, "twice", "Launching"))
        jobs = get_json(cluster, "-n", namespace, "jobs")["items"]
        assert [j["metadata"]["name"] for j in jobs] == ["twice-a0"]
    assert runner.exception is None


def _replica(cluster: Cluster, namespace: str, peering: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "LONGCAT_OPERATOR_METRICS_PORT": "0",
           "LONGCAT_PEERING_LIFETIME_S": "6", "LONGCAT_PROGRESS_INTERVAL_S": "1"}
    return subprocess.Popen([sys.executable, "-m", "longcat_operator", f"--peering={peering}", f"--namespace={namespace}"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_two_replicas_one_acts_and_the_other_takes_over(cluster, crd_installed, namespace, s3_server, s3_bucket,
                                                        tmp_path):
    cluster.kubectl("apply", "--server-side", "-f", "charts/longcat-operator/crds/kopf.dev_peerings.yaml")
    cluster.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev")
    peering = "longcat-operator"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering}}))
    _credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    logs = [tmp_path / "replica-0.log", tmp_path / "replica-1.log"]
    replicas = [_replica(cluster, namespace, peering, log) for log in logs]
    try:
        # Both replicas announce themselves before the job exists, as replicas of a running Deployment have.
        wait_for("both replicas in the peering object", lambda: len((get_json(
            cluster, "-n", namespace, "kopfpeering", peering) or {}).get("status") or {}) == 2, timeout=60)
        _apply(cluster, namespace, _job("first", s3_server, s3_bucket, nodes=1))
        wait_for("phase Launching", _phase_is(cluster, namespace, "first", "Launching"), timeout=90)
        acted = [i for i, log in enumerate(logs) if f"launched {namespace}/first" in log.read_text()]
        assert len(acted) == 1, [log.read_text()[-2000:] for log in logs]
        assert [j["metadata"]["name"] for j in get_json(cluster, "-n", namespace, "jobs")["items"]] == ["first-a0"]

        replicas[acted[0]].kill()
        standby = 1 - acted[0]
        _apply(cluster, namespace, _job("second", s3_server, s3_bucket, nodes=1))
        wait_for("the standby to launch", _phase_is(cluster, namespace, "second", "Launching"), timeout=90)
        assert f"launched {namespace}/second" in logs[standby].read_text()
    finally:
        for replica in replicas:
            replica.kill()
            replica.wait()
