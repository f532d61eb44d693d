"""After a whole tiny run through the operator, the S3 secret is nowhere but in its Secret; the pod is locked down.

The operator launches the job against the real control plane; the test then does what a kubelet would with the
pod the Job controller made: it resolves the pod's environment (values, Secret keys, the completion index),
mounts the ConfigMap as a file, runs the pod's own torchrun command (the real trainer, tiny model, CPU), and
reports the pod Running and then Succeeded. Then it searches every place a secret could leak to.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY, generate_latest

from longcat_job.progress import PROGRESS_KEY
from longcat_job.storage import S3Store
from longcat_operator.gang import CONFIG_KEY
from longcat_trainer.data.synthetic import write_shapes_dataset
from tests.fixtures.cluster import Cluster, free_port
from tests.fixtures.faults import local_command
from tests.fixtures.operator import attempt_pods, get_json, phase_is, s3_secret, set_pod_phase, wait_for
from tests.fixtures.training import job_document, location, with_vae_cache

pytestmark = [pytest.mark.faults, pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]
SECRET = "run-credentials"
NAME = "leakcheck"
SERVICE_ACCOUNT_TOKEN_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
_FIELD = re.compile(r"^metadata\.(annotations|labels)\['(.+)'\]$")


def _pod_env(cluster: Cluster, namespace: str, pod: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet builds it."""
    env: dict[str, str] = {}
    for var in pod["spec"]["containers"][0].get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        elif ref := var["valueFrom"].get("secretKeyRef"):
            secret = get_json(cluster, "-n", namespace, "secret", ref["name"])
            env[var["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        elif ref := var["valueFrom"].get("fieldRef"):
            found = _FIELD.match(ref["fieldPath"])
            assert found, ref
            env[var["name"]] = pod["metadata"][found.group(1)][found.group(2)]
    return env


def _assert_locked_down(pod: dict[str, Any]) -> None:
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0
    container = spec["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert not any(m["mountPath"].startswith(SERVICE_ACCOUNT_TOKEN_DIR) for m in container.get("volumeMounts", []))
    assert not any("projected" in v or v.get("secret") for v in spec.get("volumes", [])), spec["volumes"]


def test_a_whole_run_leaks_no_secret_and_pods_run_locked_down(
    cluster, operator, namespace, s3_server, s3_bucket, tiny_checkpoint: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
):
    caplog.set_level(logging.INFO)
    creds = s3_server.credentials
    secret_value = creds.secret_access_key.get_secret_value()
    s3_secret(cluster, namespace, SECRET, creds.access_key_id, secret_value)
    write_shapes_dataset(S3Store(s3_server.client(), s3_bucket, "data/", what="test data"), count=2, frames=9,
                         height=64, width=112)

    def where(prefix: str) -> dict[str, Any]:
        found = location(prefix, s3=s3_server, bucket=s3_bucket)
        found["s3"]["credentialsSecret"] = SECRET
        return found

    document = job_document(tiny_checkpoint, where("data/clips/"), where("data/start_frames/"), where("out/"),
                            training={"maxSteps": 4, "checkpointEvery": 2})
    with_vae_cache(document, where("cache/clips/"), where("cache/frames/"))
    document["metadata"]["name"] = NAME
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(document))
    wait_for("phase Launching", phase_is(cluster, namespace, NAME, "Launching"))
    pod = wait_for("the pod", lambda: attempt_pods(cluster, namespace, NAME, 0))[0]
    _assert_locked_down(pod)

    # The kubelet's part: the ConfigMap as a file, the environment, the pod's command.
    config_map = get_json(cluster, "-n", namespace, "configmap", pod["spec"]["volumes"][0]["configMap"]["name"])
    config = tmp_path / CONFIG_KEY
    config.write_text(config_map["data"][CONFIG_KEY])
    env = {**_pod_env(cluster, namespace, pod), "LONGCAT_METRICS_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
           "PATH": os.environ["PATH"], "HOME": str(tmp_path), "LONGCAT_DATA_CACHE": str(tmp_path / "data-cache")}
    assert env["AWS_SECRET_ACCESS_KEY"] == secret_value  # the pod gets it only through its environment
    command = local_command(pod["spec"]["containers"][0]["command"], config, node=int(env["JOB_COMPLETION_INDEX"]))
    command = [arg if not arg.startswith("--master-port=") else f"--master-port={free_port()}" for arg in command]
    set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Running")
    trainer_log = tmp_path / "trainer.log"
    metrics = ""
    with trainer_log.open("wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=Path.cwd())
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            try:  # the trainer's own /metrics, as Prometheus would scrape it
                metrics = urllib.request.urlopen(f"http://127.0.0.1:{env['LONGCAT_METRICS_PORT']}/metrics",
                                                 timeout=2).read().decode() or metrics
            except OSError:
                pass
            time.sleep(0.2)
        if proc.poll() is None:
            proc.kill()
    logs = trainer_log.read_text(errors="replace")
    assert proc.wait() == 0, logs[-4000:]
    assert "longcat_trainer_step" in metrics
    set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Succeeded", exit_code=0)
    status = wait_for("phase Succeeded", phase_is(cluster, namespace, NAME, "Succeeded"), timeout=90)
    assert status["progress"]["step"] == 4 and status["artifacts"]["lora"].startswith(f"s3://{s3_bucket}/out/")

    places = {
        "ConfigMaps": cluster.kubectl("get", "configmaps", "-n", namespace, "-o", "json").stdout,
        "the job (spec and status)": cluster.kubectl("get", "lcj", NAME, "-n", namespace, "-o", "json").stdout,
        "events": cluster.kubectl("get", "events", "-n", namespace, "-o", "json").stdout,
        "pods and Jobs": cluster.kubectl("get", "pods,jobs", "-n", namespace, "-o", "json").stdout,
        "operator logs": caplog.text,  # kopf logs through `logging`; its runner's output exists only once it stops
        "trainer logs": logs,
        "progress.json": s3_server.client().get_object(Bucket=s3_bucket, Key=f"out/{PROGRESS_KEY}")["Body"].read()
        .decode(),
        "trainer metrics": metrics,
        "operator metrics": generate_latest(REGISTRY).decode(),
    }
    encoded = base64.b64encode(secret_value.encode()).decode()
    for place, text in places.items():
        assert text, f"nothing captured from {place}"
        assert secret_value not in text and encoded not in text, f"the secret key leaked into {place}"
    assert "leakcheck" in places["operator logs"]  # the capture did see the operator at work
