"""The operator stopped mid-work, and jobs whose credentials Secret is missing or incomplete.

Against the real control plane and S3 server, with the in-process operator stopped and a new one started
(what a crashed or upgraded operator pod is). There is no kubelet: as in tests/test_operator.py, the test
plays its part by patching pod status, and writes progress.json where a trainer would.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from longcat_operator.gang import LABEL_JOB
from tests.fixtures.cluster import Cluster
from tests.fixtures.operator import (
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
from tests.invalid_jobs import CASES

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.s3]
# Events a job may post in its whole life here (Launched, the phases, Succeeded): more means a loop.
MAX_EVENTS = 12


def _jobs(cluster: Cluster, namespace: str) -> list[str]:
    return sorted(j["metadata"]["name"] for j in get_json(cluster, "-n", namespace, "jobs")["items"])


def _events(cluster: Cluster, namespace: str, name: str) -> Counter[tuple[str, str]]:
    """Events about the LongCatI2VJob `name` by (reason, message), each counted as often as it was posted."""
    events = get_json(cluster, "-n", namespace, "events")["items"]
    counts: Counter[tuple[str, str]] = Counter()
    for event in events:
        if event["involvedObject"].get("kind") == "LongCatI2VJob" and event["involvedObject"]["name"] == name:
            counts[event["reason"], event["message"][:60]] += event.get("count") or 1
    return counts


def test_operator_killed_during_launch_and_during_training(cluster, crd_installed, namespace, s3_server, s3_bucket):
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)

    # Killed while it validates and runs the preflight: the next one finishes the launch, once.
    with running_operator(cluster, namespace) as first:
        apply_job(cluster, namespace, s3_job("crash", s3_server, s3_bucket, nodes=2))
        wait_for("the launch to begin", lambda: job_status(cluster, namespace, "crash").get("phase"), interval=0.02)
    assert first.exception is None
    with running_operator(cluster, namespace) as second:
        wait_for("phase Launching", phase_is(cluster, namespace, "crash", "Launching"))
        pods = wait_for("2 pods", lambda: (p := attempt_pods(cluster, namespace, "crash", 0)) and len(p) == 2 and p)
        for pod in pods:
            set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Running")
        write_progress(s3_server, s3_bucket, "crash", "Training", 3)
        wait_for("step 3 in status",
                 lambda: job_status(cluster, namespace, "crash").get("progress", {}).get("step") == 3)
    assert second.exception is None
    assert _jobs(cluster, namespace) == ["crash-a0"]

    # Killed while the gang trains; the trainer goes on meanwhile, and one pod fails while nobody watches.
    write_progress(s3_server, s3_bucket, "crash", "Training", 7)
    set_pod_phase(cluster, namespace, pods[1]["metadata"]["name"], "Failed", exit_code=137)
    with running_operator(cluster, namespace) as third:
        status = wait_for("the gang restarted once", lambda: (s := job_status(cluster, namespace, "crash")).get(
            "restarts") == 1 and s, timeout=60)
        wait_for("attempt 0 gone", lambda: _jobs(cluster, namespace) == ["crash-a1"])
        assert status["progress"]["step"] == 7
        pods = wait_for("pods of attempt 1",
                        lambda: (p := attempt_pods(cluster, namespace, "crash", 1)) and len(p) == 2 and p)
    assert third.exception is None

    # Killed again; the gang finishes while it is down: the next one sees it and reports success once.
    write_progress(s3_server, s3_bucket, "crash", "Succeeded", 10, lora=f"s3://{s3_bucket}/out/crash/lora.safetensors")
    for pod in pods:
        set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Succeeded", exit_code=0)
    with running_operator(cluster, namespace) as fourth:
        status = wait_for("phase Succeeded", phase_is(cluster, namespace, "crash", "Succeeded"), timeout=90)
        assert status["restarts"] == 1 and status["progress"]["step"] == 10
        assert status["artifacts"]["lora"].endswith("out/crash/lora.safetensors")
    assert fourth.exception is None
    assert _jobs(cluster, namespace) == ["crash-a1"]

    events = _events(cluster, namespace, "crash")
    assert sum(events.values()) <= MAX_EVENTS, events
    by_reason = Counter()
    for (reason, _), count in events.items():
        by_reason[reason] += count
    assert by_reason["GangRestarted"] == 1 and by_reason.get("GangRecreated", 0) == 0, events
    assert by_reason["Launched"] <= 1 and max(events.values()) == 1, events  # nothing posted twice
    print(f"events over 4 operator lives: {dict(events)}")


def _no_credentials_job(name: str, s3, bucket: str, secret: str) -> dict[str, Any]:
    job = s3_job(name, s3, bucket, nodes=1)
    for where in [*(d["source"] for d in job["spec"]["datasets"]), job["spec"]["output"]]:
        where["s3"]["credentialsSecret"] = secret
    return job


def test_missing_or_incomplete_secret_fails_before_any_pod_while_other_jobs_run(
    cluster, operator, namespace, s3_server, s3_bucket
):
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    cluster.kubectl("create", "secret", "generic", "half-secret", "-n", namespace,
                    "--from-literal=AWS_ACCESS_KEY_ID=someone")
    apply_job(cluster, namespace, _no_credentials_job("nosecret", s3_server, s3_bucket, "absent-secret"))
    apply_job(cluster, namespace, _no_credentials_job("halfsecret", s3_server, s3_bucket, "half-secret"))
    apply_job(cluster, namespace, s3_job("good", s3_server, s3_bucket, nodes=1))

    # Every malformed job of the catalogue, applied for real while the operator works: none is stored.
    refused = cluster.kubectl("apply", "-n", namespace, "-f", "-", check=False,
                              input="\n---\n".join(json.dumps(case.document()) for case in CASES))
    assert refused.returncode != 0 and "created" not in refused.stdout, refused.stdout
    stored = get_json(cluster, "-n", namespace, "lcj")["items"]
    assert sorted(j["metadata"]["name"] for j in stored) == ["good", "halfsecret", "nosecret"]

    wait_for("the good job to launch", phase_is(cluster, namespace, "good", "Launching"))
    for name, secret, reason, text in [
        ("halfsecret", "half-secret", "CredentialsInvalid", "lacks AWS_SECRET_ACCESS_KEY"),
        # The operator waits for a Secret created just after its job (3 tries, 10 s apart), then gives up.
        ("nosecret", "absent-secret", "CredentialsMissing", "does not exist"),
    ]:
        status = wait_for(f"{name} Failed", phase_is(cluster, namespace, name, "Failed"), timeout=90)
        ready = next(c for c in status["conditions"] if c["type"] == "DatasetReady")
        assert ready["status"] == "False" and ready["reason"] == reason, ready
        assert f"Secret '{secret}'" in ready["message"] and text in ready["message"], ready
        assert "someone" not in json.dumps(status)
    assert _jobs(cluster, namespace) == ["good-a0"]
    pods = get_json(cluster, "-n", namespace, "pods")["items"]
    assert {p["metadata"]["labels"][LABEL_JOB] for p in pods} == {"good"}
