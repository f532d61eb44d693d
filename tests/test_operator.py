"""The operator against the real control plane and the real S3 server.

There is no kubelet: tests play its part by patching pod status (Running, Failed with an exit code, Succeeded),
and the real Job controller turns that into Job conditions the operator reacts to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import kopf
import pytest

from longcat_job.failures import ExitCode
from longcat_job.progress import PROGRESS_KEY, TrainerProgress
from longcat_operator import apply, read, reconcile
from tests.fixtures.cluster import Cluster
from tests.fixtures.operator import (
    SECRET,
    apply_job,
    attempt_pods,
    credentials_and_data,
    get_json,
    job_status,
    phase_is,
    running_operator,
    s3_job,
    set_pod_phase,
    wait_for,
    write_progress,
)

pytestmark = [pytest.mark.cluster, pytest.mark.s3]


def test_job_runs_fails_restarts_and_succeeds(cluster, operator, namespace, s3_server, s3_bucket):
    secret_value = s3_server.credentials.secret_access_key.get_secret_value()
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    apply_job(cluster, namespace, s3_job("train", s3_server, s3_bucket))

    status = wait_for("phase Launching", phase_is(cluster, namespace, "train", "Launching"))
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

    pods = wait_for("2 pods of attempt 0",
                    lambda: (p := attempt_pods(cluster, namespace, "train", 0)) and len(p) == 2 and p)
    for pod in pods:
        set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Running")
    write_progress(s3_server, s3_bucket, "train", "Training", 4)
    status = wait_for("training progress", lambda: (s := job_status(cluster, namespace, "train")).get(
        "progress", {}).get("step") == 4 and s.get("phase") == "Training" and s)
    assert status["progress"]["stepDisplay"] == "4/10" and status["progress"]["loss"] == 0.25
    table = cluster.kubectl("get", "lcj", "train", "-n", namespace).stdout
    assert "Training" in table and "4/10" in table and "0.25" in table and "12m05s" in table
    assert table.splitlines()[0].split()[:6] == ["NAME", "PHASE", "STEP", "LOSS", "ETA", "RESTARTS"]

    set_pod_phase(cluster, namespace, pods[1]["metadata"]["name"], "Failed", exit_code=137)
    status = wait_for("a gang restart",
                      lambda: (s := job_status(cluster, namespace, "train")).get("restarts") == 1 and s)
    wait_for("attempt 0 deleted", lambda: get_json(cluster, "-n", namespace, "job", "train-a0") is None)
    assert get_json(cluster, "-n", namespace, "job", "train-a1") is not None

    pods = wait_for("pods of attempt 1",
                    lambda: (p := attempt_pods(cluster, namespace, "train", 1)) and len(p) == 2 and p)
    write_progress(s3_server, s3_bucket, "train", "Succeeded", 10, lora=f"s3://{s3_bucket}/out/train/lora.safetensors")
    for pod in pods:
        set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Succeeded", exit_code=0)
    status = wait_for("phase Succeeded", phase_is(cluster, namespace, "train", "Succeeded"), timeout=90)
    assert status["artifacts"]["lora"] == f"s3://{s3_bucket}/out/train/lora.safetensors"
    assert status["progress"]["step"] == 10 and status["completionTime"]
    events = cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    for reason in ("Launched", "GangRestarted", "Succeeded"):
        assert f'"reason": "{reason}"' in events
    assert secret_value not in events and secret_value not in json.dumps(status)


def test_missing_start_frames_fail_before_any_pod(cluster, operator, namespace, s3_server, s3_bucket):
    credentials_and_data(cluster, namespace, s3_server, s3_bucket, start_frames=["beach"])
    apply_job(cluster, namespace, s3_job("nodata", s3_server, s3_bucket))
    status = wait_for("phase Failed", phase_is(cluster, namespace, "nodata", "Failed"))
    ready = next(c for c in status["conditions"] if c["type"] == "DatasetReady")
    assert ready["status"] == "False" and ready["reason"] == "PreflightFailed"
    assert "city.mp4" in ready["message"] and "forest.mp4" in ready["message"] and "beach" not in ready["message"]
    assert get_json(cluster, "-n", namespace, "jobs")["items"] == []


def test_a_corrupt_clip_fails_preflight_naming_it_before_any_pod(cluster, operator, namespace, s3_server,
                                                                 s3_bucket):
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    s3_server.client().put_object(Bucket=s3_bucket, Key="clips/city.mp4", Body=b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    apply_job(cluster, namespace, s3_job("corrupt", s3_server, s3_bucket))
    status = wait_for("phase Failed", phase_is(cluster, namespace, "corrupt", "Failed"))
    ready = next(c for c in status["conditions"] if c["type"] == "DatasetReady")
    assert ready["status"] == "False" and ready["reason"] == "PreflightFailed"
    assert "ClipUnreadable" in ready["message"] and "city.mp4" in ready["message"]
    assert "beach" not in ready["message"] and "forest" not in ready["message"]
    assert get_json(cluster, "-n", namespace, "jobs")["items"] == []


def test_bad_input_exit_code_fails_without_restart(cluster, operator, namespace, s3_server, s3_bucket):
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    apply_job(cluster, namespace, s3_job("badinput", s3_server, s3_bucket, nodes=1))
    wait_for("phase Launching", phase_is(cluster, namespace, "badinput", "Launching"))
    pod = wait_for("the pod", lambda: attempt_pods(cluster, namespace, "badinput", 0))[0]
    set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Failed", exit_code=ExitCode.CONFIG)
    status = wait_for("phase Failed", phase_is(cluster, namespace, "badinput", "Failed"))
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "BadInput" and "samples unreadable" in failed["message"]
    assert status.get("restarts", 0) == 0


def test_trainer_reported_config_error_fails_without_restart(cluster, operator, namespace, s3_server, s3_bucket):
    # Under torchrun the pod exits 1 whatever the trainer meant; progress.json says it was the configuration.
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    apply_job(cluster, namespace, s3_job("badconfig", s3_server, s3_bucket, nodes=1))
    wait_for("phase Launching", phase_is(cluster, namespace, "badconfig", "Launching"))
    pod = wait_for("the pod", lambda: attempt_pods(cluster, namespace, "badconfig", 0))[0]
    failed = TrainerProgress(phase="Failed", failure={"reason": "InvalidConfig",
                             "message": "model source hf://nobody/nothing: repository not found"},
                             updated="2026-11-25T12:00:00Z")
    s3_server.client().put_object(Bucket=s3_bucket, Key=f"out/badconfig/{PROGRESS_KEY}", Body=failed.to_json())
    set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Failed", exit_code=1)
    status = wait_for("phase Failed", phase_is(cluster, namespace, "badconfig", "Failed"))
    condition = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert condition["reason"] == "InvalidConfig" and "repository not found" in condition["message"]
    assert status.get("restarts", 0) == 0


def test_local_directories_are_refused_in_a_cluster(cluster, operator, namespace, s3_server, s3_bucket):
    job = s3_job("local", s3_server, s3_bucket)
    job["spec"]["output"] = {"local": {"path": "/output"}}
    apply_job(cluster, namespace, job)
    status = wait_for("phase Failed", phase_is(cluster, namespace, "local", "Failed"))
    validated = next(c for c in status["conditions"] if c["type"] == "Validated")
    assert validated["reason"] == "LocalLocation"
    assert "spec.output.local" in validated["message"] and "longcat-i2v run" in validated["message"]


def _conditions(status: dict) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status.get("conditions", [])}


def test_suspend_resume_run_succeed_and_delete(cluster, operator, namespace, s3_server, s3_bucket):
    """Phase and conditions at every point of suspend -> resume -> running -> succeeded, then delete."""
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    apply_job(cluster, namespace, s3_job("pause", s3_server, s3_bucket, nodes=1))
    wait_for("phase Launching", phase_is(cluster, namespace, "pause", "Launching"))
    pod = wait_for("the pod", lambda: attempt_pods(cluster, namespace, "pause", 0))[0]
    set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Running")
    running = wait_for("phase Caching", phase_is(cluster, namespace, "pause", "Caching"))
    assert _conditions(running)["Running"] == ("True", "AllPodsRunning")

    cluster.kubectl("patch", "lcj", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for("the Job suspended", lambda: get_json(cluster, "-n", namespace, "job", "pause-a0")["spec"]["suspend"])
    held = wait_for("phase Suspended", phase_is(cluster, namespace, "pause", "Suspended"))
    assert _conditions(held)["Suspended"] == ("True", "JobSuspended")
    assert _conditions(held)["Running"] == ("False", "Suspended")
    generation = get_json(cluster, "-n", namespace, "lcj", "pause")["metadata"]["generation"]
    assert next(c for c in held["conditions"] if c["type"] == "Suspended")["observedGeneration"] == generation

    cluster.kubectl("patch", "lcj", "pause", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for("the Job resumed", lambda: not get_json(cluster, "-n", namespace, "job", "pause-a0")["spec"]["suspend"])
    resumed = wait_for("phase Launching", phase_is(cluster, namespace, "pause", "Launching"))
    assert _conditions(resumed)["Suspended"] == ("False", "JobResumed")
    # The Job controller deleted the suspended pod and makes a new one on resume.
    pod = wait_for("a new pod", lambda: [p for p in attempt_pods(cluster, namespace, "pause", 0)
                                         if p["metadata"]["name"] != pod["metadata"]["name"]
                                         and not p["metadata"].get("deletionTimestamp")])[0]
    set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Running")
    write_progress(s3_server, s3_bucket, "pause", "Training", 6)
    training = wait_for("phase Training", phase_is(cluster, namespace, "pause", "Training"))
    assert _conditions(training)["Running"] == ("True", "AllPodsRunning")
    write_progress(s3_server, s3_bucket, "pause", "Succeeded", 10, lora=f"s3://{s3_bucket}/out/pause/lora")
    set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Succeeded", exit_code=0)
    done = wait_for("phase Succeeded", phase_is(cluster, namespace, "pause", "Succeeded"), timeout=90)
    assert _conditions(done)["Complete"] == ("True", "Succeeded") and "Failed" not in _conditions(done)
    assert _conditions(done)["Suspended"] == ("False", "JobResumed")

    cluster.kubectl("delete", "lcj", "pause", "-n", namespace)
    for kind, name in (("job", "pause-a0"), ("service", "lcj-pause"), ("configmap", "pause-config")):
        wait_for(f"{kind} {name} garbage-collected", lambda: get_json(cluster, "-n", namespace, kind, name) is None)
    assert s3_server.client().head_object(Bucket=s3_bucket, Key="out/pause/manifest.json")


def test_delete_with_the_operator_down_removes_the_job_and_its_gang(cluster, crd_installed, namespace, s3_server,
                                                                     s3_bucket):
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    with running_operator(cluster, namespace) as runner:
        apply_job(cluster, namespace, s3_job("orphan", s3_server, s3_bucket, nodes=1))
        wait_for("phase Launching", phase_is(cluster, namespace, "orphan", "Launching"))
        wait_for("the pod", lambda: attempt_pods(cluster, namespace, "orphan", 0))
        for _ in range(10):  # several timer passes (1 s apart): kopf would have added its finalizer by now
            assert not get_json(cluster, "-n", namespace, "lcj", "orphan")["metadata"].get("finalizers")
            time.sleep(0.3)
    assert runner.exception is None, runner.exception

    started = time.monotonic()
    cluster.kubectl("delete", "lcj", "orphan", "-n", namespace, "--timeout=10s")  # returns: nothing blocks it
    children = (("job", "orphan-a0"), ("service", "lcj-orphan"), ("configmap", "orphan-config"))
    wait_for("the gang garbage-collected", lambda: all(get_json(cluster, "-n", namespace, kind, name) is None
                                                       for kind, name in children), timeout=10)
    wait_for("its pods gone", lambda: not attempt_pods(cluster, namespace, "orphan", 0),
             timeout=10 - (time.monotonic() - started))
    assert get_json(cluster, "-n", namespace, "lcj", "orphan") is None


def _gang_objects(cluster: Cluster, namespace: str, name: str, attempt: int = 0) -> list[str]:
    children = (("job", f"{name}-a{attempt}"), ("service", f"lcj-{name}"), ("configmap", f"{name}-config"))
    return [kind for kind, child in children if get_json(cluster, "-n", namespace, kind, child) is not None]


def test_ttl_after_finished_deletes_the_gang_and_keeps_the_job(cluster, operator, namespace, s3_server, s3_bucket):
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    apply_job(cluster, namespace, s3_job("ttl", s3_server, s3_bucket, nodes=1, ttlSecondsAfterFinished=3))
    pod = wait_for("the pod", lambda: attempt_pods(cluster, namespace, "ttl", 0))[0]
    set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Succeeded", exit_code=0)
    wait_for("phase Succeeded", phase_is(cluster, namespace, "ttl", "Succeeded"), timeout=90)
    assert _gang_objects(cluster, namespace, "ttl") == ["job", "service", "configmap"]  # kept until the TTL
    status = wait_for("the TTL", lambda: (s := job_status(cluster, namespace, "ttl")) and any(
        c["type"] == "GangDeleted" and c["status"] == "True" for c in s.get("conditions", [])) and s, timeout=30)
    assert status["phase"] == "Succeeded"
    wait_for("the gang's objects deleted", lambda: not _gang_objects(cluster, namespace, "ttl"), timeout=10)
    assert get_json(cluster, "-n", namespace, "lcj", "ttl") is not None  # the record stays ...
    assert s3_server.client().head_object(Bucket=s3_bucket, Key="out/ttl/manifest.json")  # ... and the artifacts


def test_active_deadline_stops_the_gang_and_fails_the_job(cluster, operator, namespace, s3_server, s3_bucket):
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    apply_job(cluster, namespace, s3_job("deadline", s3_server, s3_bucket, nodes=1, activeDeadlineSeconds=4))
    pod = wait_for("the pod", lambda: attempt_pods(cluster, namespace, "deadline", 0))[0]
    set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Running")
    status = wait_for("phase Failed", phase_is(cluster, namespace, "deadline", "Failed"), timeout=30)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "DeadlineExceeded" and "activeDeadlineSeconds=4" in failed["message"]
    wait_for("the attempt's Job deleted", lambda: get_json(cluster, "-n", namespace, "job", "deadline-a0") is None)


def test_operator_restart_during_launch_makes_one_job(cluster, crd_installed, namespace, s3_server, s3_bucket):
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    with running_operator(cluster, namespace):
        apply_job(cluster, namespace, s3_job("twice", s3_server, s3_bucket, nodes=1))
        wait_for("validation started", lambda: job_status(cluster, namespace, "twice").get("phase"), interval=0.05)
    with running_operator(cluster, namespace) as runner:
        wait_for("phase Launching", phase_is(cluster, namespace, "twice", "Launching"))
        jobs = get_json(cluster, "-n", namespace, "jobs")["items"]
        assert [j["metadata"]["name"] for j in jobs] == ["twice-a0"]
    assert runner.exception is None


def test_a_stale_timer_body_does_not_bring_back_a_replaced_attempt(cluster, crd_installed, namespace, s3_server,
                                                                   s3_bucket, monkeypatch):
    """The timer may run on a body from before its own restart's status patch (a slow watch): it must not
    recreate the attempt that the restart replaced."""
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    apply_job(cluster, namespace, s3_job("stale", s3_server, s3_bucket, nodes=1))
    launched = {"type": "Launched", "status": "True", "reason": "GangCreated", "message": "",
                "lastTransitionTime": "2026-11-25T12:00:00Z"}
    body = kopf.Body({**get_json(cluster, "-n", namespace, "lcj", "stale"),
                      "status": {"phase": "Training", "conditions": [launched]}})
    apply.create_attempt(read.job_of(body, reconcile.SETTINGS), apply.owner(body), 1, reconcile.SETTINGS)  # 1 replaced 0
    patch = kopf.Patch()
    reconcile.observe(body=body, patch=patch)
    assert not patch and job_status(cluster, namespace, "stale") == {}  # nothing written either
    assert [j["metadata"]["name"] for j in get_json(cluster, "-n", namespace, "jobs")["items"]] == ["stale-a1"]


def _replica(cluster: Cluster, namespace: str, peering: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "LONGCAT_OPERATOR_METRICS_PORT": "0",
           "LONGCAT_PEERING_LIFETIME_S": "20", "LONGCAT_PROGRESS_INTERVAL_S": "1"}
    return subprocess.Popen([sys.executable, "-m", "longcat_operator", f"--peering={peering}", f"--namespace={namespace}"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def test_two_replicas_one_acts_and_the_other_takes_over(cluster, crd_installed, namespace, s3_server, s3_bucket,
                                                        tmp_path):
    cluster.kubectl("apply", "--server-side", "-f", "charts/longcat-operator/crds/kopf.dev_peerings.yaml")
    cluster.kubectl("wait", "--for=condition=Established", "crd/kopfpeerings.kopf.dev")
    peering = "longcat-operator"
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": peering}}))
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    logs = [tmp_path / "replica-0.log", tmp_path / "replica-1.log"]
    replicas = [_replica(cluster, namespace, peering, log) for log in logs]
    try:
        # Both replicas announce themselves before the job exists, as replicas of a running Deployment have.
        wait_for("both replicas in the peering object", lambda: len((get_json(
            cluster, "-n", namespace, "kopfpeering", peering) or {}).get("status") or {}) == 2, timeout=60)
        apply_job(cluster, namespace, s3_job("first", s3_server, s3_bucket, nodes=1))
        wait_for("phase Launching", phase_is(cluster, namespace, "first", "Launching"), timeout=90)
        acted = [i for i, log in enumerate(logs) if f"launched {namespace}/first" in log.read_text()]
        assert len(acted) == 1, [log.read_text()[-2000:] for log in logs]
        assert [j["metadata"]["name"] for j in get_json(cluster, "-n", namespace, "jobs")["items"]] == ["first-a0"]

        replicas[acted[0]].kill()
        standby = 1 - acted[0]
        apply_job(cluster, namespace, s3_job("second", s3_server, s3_bucket, nodes=1))
        wait_for("the standby to launch", phase_is(cluster, namespace, "second", "Launching"), timeout=90)
        assert f"launched {namespace}/second" in logs[standby].read_text()
    finally:
        for replica in replicas:
            replica.kill()
            replica.wait()


def test_locations_without_an_endpoint_use_the_operators_default(cluster, crd_installed, namespace, s3_server,
                                                                 s3_bucket, monkeypatch):
    """The chart's trainer.defaultS3Endpoint serves the operator's own preflight as it serves the pods."""
    monkeypatch.setattr(reconcile, "SETTINGS", reconcile.SETTINGS.model_copy(
        update={"default_s3_endpoint": s3_server.endpoint}))
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    job = s3_job("noendpoint", s3_server, s3_bucket, nodes=1)
    for location in [d["source"] for d in job["spec"]["datasets"]] + [job["spec"]["output"]]:
        del location["s3"]["endpoint"]
    with running_operator(cluster, namespace):
        apply_job(cluster, namespace, job)
        status = wait_for("phase Launching", phase_is(cluster, namespace, "noendpoint", "Launching"))
    assert status["datasets"][0]["samples"] == 3
    config = json.loads(get_json(cluster, "-n", namespace, "configmap", "noendpoint-config")["data"]["job.json"])
    assert config["spec"]["output"]["s3"]["endpoint"] == s3_server.endpoint
