"""The optional validating webhook, served by the operator and called by the real API server."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.fixtures.cluster import free_port, write_pki
from tests.fixtures.operator import wait_for
from tests.invalid_jobs import MINIMAL

pytestmark = pytest.mark.cluster


def _webhook_configuration(name: str, namespace: str, port: int, ca: bytes) -> dict:
    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": name},
        "webhooks": [{
            "name": "validate-job.longcat.video",
            "clientConfig": {"url": f"https://127.0.0.1:{port}/validate-job", "caBundle": base64.b64encode(ca).decode()},
            "rules": [{"apiGroups": ["longcat.video"], "apiVersions": ["v1alpha1"], "operations": ["CREATE", "UPDATE"],
                       "resources": ["longcati2vjobs"]}],
            # Only this test's namespace: other tests keep running without the webhook.
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
            "failurePolicy": "Fail",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 10,
        }],
    }


def _authors(cluster, namespace: str) -> None:
    """alice and bob may create and change jobs in the namespace; only bob may read Secret s3-credentials."""
    jobs = {"apiGroups": ["longcat.video"], "resources": ["longcati2vjobs"],
            "verbs": ["create", "get", "list", "patch", "update"]}
    secret = {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["s3-credentials"], "verbs": ["get"]}
    items = []
    for user, rules in (("alice", [jobs]), ("bob", [jobs, secret])):
        items += [
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
             "metadata": {"name": f"{user}-role", "namespace": namespace}, "rules": rules},
            {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
             "metadata": {"name": f"{user}-binding", "namespace": namespace},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"{user}-role"},
             "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]},
        ]
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))


def test_webhook_refuses_what_the_operator_would_fail(crd_installed, namespace, tmp_path):
    cluster = crd_installed
    pki = write_pki(tmp_path)  # a CA and a serving certificate for 127.0.0.1
    certs = tmp_path / "webhook"
    certs.mkdir()
    shutil.copy(pki.serving_cert, certs / "tls.crt")
    shutil.copy(pki.serving_key, certs / "tls.key")
    port = free_port()
    # The operator as the chart runs it with the webhook on: its own process, settings from the environment.
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "LONGCAT_OPERATOR_METRICS_PORT": "0",
           "LONGCAT_WEBHOOK_PORT": str(port), "LONGCAT_WEBHOOK_CERT_DIR": str(certs),
           "LONGCAT_ALLOWED_S3_ENDPOINTS": "http://minio.team-a:9000"}
    config = _webhook_configuration(f"longcat-{namespace}", namespace, port, pki.ca_cert.read_bytes())

    local = json.loads(json.dumps(MINIMAL))
    local["metadata"]["name"] = "local-output"
    local["spec"]["output"] = {"local": {"path": "/output"}}
    two_secrets = json.loads(json.dumps(MINIMAL))
    two_secrets["metadata"]["name"] = "two-secrets"
    two_secrets["spec"]["output"]["s3"]["credentialsSecret"] = "other-secret"

    log = (tmp_path / "operator.log").open("w")
    operator = subprocess.Popen([sys.executable, "-m", "longcat_operator", "--standalone", f"--namespace={namespace}"],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        cluster.kubectl("apply", "-f", "-", input=json.dumps(config))
        try:
            def refused_local():
                result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(local), check=False)
                # Until the operator's server listens, the API server answers that it cannot call the webhook;
                # until it has seen the new configuration, it calls none and stores the job: try again.
                if result.returncode == 0:
                    cluster.kubectl("delete", "lcj", local["metadata"]["name"], "-n", namespace)
                    return None
                return result if "failed calling webhook" not in result.stderr else None

            result = wait_for("the webhook to answer", refused_local, timeout=60, interval=1)
            assert result.returncode != 0
            assert "spec.output.local" in result.stderr and "longcat-i2v run" in result.stderr
            result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(two_secrets), check=False)
            assert result.returncode != 0 and "other-secret, s3-credentials" in result.stderr
            for endpoint, why in (("http://169.254.169.254", "cloud metadata address"),
                                  ("http://10.0.0.7:9000", "not allowed in this cluster")):
                elsewhere = json.loads(json.dumps(MINIMAL))
                elsewhere["metadata"]["name"] = "elsewhere"
                elsewhere["spec"]["output"]["s3"]["endpoint"] = endpoint
                result = cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(elsewhere), check=False)
                assert result.returncode != 0 and f"spec.output.s3.endpoint: endpoint {endpoint}" in result.stderr
                assert why in result.stderr
            _authors(cluster, namespace)
            # alice may create jobs but not read the Secret the job names: the job would lend it to her.
            as_alice = cluster.kubectl("--as=alice", "apply", "-n", namespace, "-f", "-", input=json.dumps(MINIMAL),
                                       check=False)
            assert as_alice.returncode != 0
            assert "alice may not get Secret 's3-credentials'" in as_alice.stderr, as_alice.stderr
            cluster.kubectl("--as=bob", "apply", "-n", namespace, "-f", "-", input=json.dumps(MINIMAL))
            # Once created, a job's Secrets cannot change: alice may suspend bob's job.
            cluster.kubectl("--as=alice", "patch", "lcj", "minimal", "-n", namespace, "--type=merge",
                            "-p", '{"spec":{"suspend":true}}')
        finally:
            cluster.kubectl("delete", "validatingwebhookconfiguration", config["metadata"]["name"], check=False)
    finally:
        operator.terminate()
        operator.wait(30)
    stored = cluster.kubectl("get", "lcj", "-n", namespace, "-o", "name").stdout.split()
    assert stored == ["longcati2vjob.longcat.video/minimal"]
