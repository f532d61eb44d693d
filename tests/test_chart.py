"""The Helm chart: lint and render it, install it into the real control plane, and check its RBAC there.

The operator's ServiceAccount must be able to do what the operator does (kube.py, kopf's events, peering)
and nothing more: `kubectl auth can-i --as` asks the real RBAC authorizer both ways.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.fixtures.cluster import Cluster, free_port
from tests.fixtures.helm import CHART, RELEASE_NS, Helm

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = CHART / "dashboards" / "longcat-training.json"
NON_DEFAULT = [
    "--set", "replicaCount=3", "--set", "image.tag=9.9.9",
    "--set", "trainer.image=registry.example/trainer:1", "--set", "trainer.gpuResource=amd.com/gpu",
    "--set", "trainer.metricsPort=9400", "--set", "trainer.defaultS3Endpoint=http://minio.storage:9000",
    "--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true",
    "--set", "dashboard.namespace=monitoring", "--set", "webhook.enabled=true",
]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env_of(docs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container(docs)["env"] if "value" in e}


# --- offline: lint, template, schema -----------------------------------------------------------------------------


def test_lint_with_default_and_non_default_values(helm: Helm) -> None:
    helm("lint", "--strict", str(CHART))
    helm("lint", "--strict", str(CHART), *NON_DEFAULT, "--set", "watch.clusterWide=true")


def test_default_render_is_a_namespaced_least_privilege_operator(helm: Helm) -> None:
    docs = helm.template()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRoleBinding", "RoleBinding",
                            "Service", "Deployment", "KopfPeering", "ConfigMap"])
    deployment = one(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    main = container(docs)
    assert deployment["spec"]["replicas"] == 2
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert main["securityContext"]["readOnlyRootFilesystem"] is True
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["resources"]["requests"]["cpu"] and main["resources"]["requests"]["memory"]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz" and main["readinessProbe"]
    assert main["image"] == "ghcr.io/longcat-i2v/operator:0.1.0"  # the chart's appVersion
    # Namespaced by default: the release namespace only, leader election in its KopfPeering.
    assert main["args"] == ["--peering=lc-longcat-operator", "--liveness=http://0.0.0.0:8080/healthz",
                            f"--namespace={RELEASE_NS}"]
    peering = one(docs, "KopfPeering")["metadata"]
    assert (peering["name"], peering["namespace"]) == ("lc-longcat-operator", RELEASE_NS)
    binding = one(docs, "RoleBinding")
    assert binding["metadata"]["namespace"] == RELEASE_NS and binding["roleRef"]["name"] == "lc-longcat-operator-jobs"
    env = env_of(docs)
    assert env["LONGCAT_TRAINER_IMAGE"] == "ghcr.io/longcat-i2v/trainer:0.1.0"
    assert env["LONGCAT_GPU_RESOURCE"] == "nvidia.com/gpu" and env["LONGCAT_METRICS_PORT"] == "9090"
    assert "LONGCAT_DEFAULT_S3_ENDPOINT" not in env
    # Secrets: read one by name, never list them (a list would show every Secret's data).
    rules = next(r for r in by_kind(docs, "ClusterRole") if r["metadata"]["name"].endswith("-jobs"))["rules"]
    secrets = [r for r in rules if "secrets" in r["resources"]]
    assert secrets == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in rules)

    dashboard = one(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["longcat-training.json"]) == json.loads(DASHBOARD.read_text())


def test_dashboard_panels_are_well_formed() -> None:
    """What Grafana needs to lay the dashboard out; that each query finds data is test_observability's job."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels), "panel ids must be unique"
    for panel in panels:
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, f"{panel['title']} is wider than the dashboard"
        if panel["type"] != "row":
            assert panel["targets"] and all(t["expr"] and t["datasource"]["uid"] == "${datasource}"
                                            for t in panel["targets"]), panel["title"]
    occupied = [(p["gridPos"]["y"], x) for p in panels
                for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])]
    assert len(occupied) == len(set(occupied)), "panels overlap"


def test_non_default_values_reach_the_objects(helm: Helm) -> None:
    docs = helm.template(*NON_DEFAULT, "--set", "watch.namespaces={team-a,team-b}")
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    main = container(docs)
    assert main["image"] == "ghcr.io/longcat-i2v/operator:9.9.9"
    assert [a for a in main["args"] if a.startswith("--namespace")] == [
        f"--namespace={RELEASE_NS}", "--namespace=team-a", "--namespace=team-b"]
    assert {b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")} == {RELEASE_NS, "team-a", "team-b"}
    assert {p["metadata"]["namespace"] for p in by_kind(docs, "KopfPeering")} == {RELEASE_NS, "team-a", "team-b"}
    env = env_of(docs)
    assert (env["LONGCAT_TRAINER_IMAGE"], env["LONGCAT_GPU_RESOURCE"], env["LONGCAT_METRICS_PORT"]) == (
        "registry.example/trainer:1", "amd.com/gpu", "9400")
    assert env["LONGCAT_DEFAULT_S3_ENDPOINT"] == "http://minio.storage:9000"
    assert one(docs, "ConfigMap")["metadata"]["namespace"] == "monitoring"
    assert one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["honorLabels"] is True
    pod_monitor = one(docs, "PodMonitor")
    assert pod_monitor["spec"]["namespaceSelector"]["matchNames"] == [RELEASE_NS, "team-a", "team-b"]
    assert pod_monitor["spec"]["selector"]["matchExpressions"][0]["key"] == "longcat.video/job"

    # Without cert-manager the chart makes a CA and a serving certificate for the webhook's Service name.
    x509 = pytest.importorskip("cryptography.x509")
    secret = one(docs, "Secret")
    webhook = one(docs, "ValidatingWebhookConfiguration")["webhooks"][0]
    assert webhook["clientConfig"]["caBundle"] == secret["data"]["ca.crt"]
    serving = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert f"lc-longcat-operator.{RELEASE_NS}.svc" in names
    assert webhook["clientConfig"]["service"]["name"] == one(docs, "Service")["metadata"]["name"]
    assert env["LONGCAT_WEBHOOK_PORT"] == "9443"


def test_cluster_wide_binds_everywhere_and_uses_cluster_peering(helm: Helm) -> None:
    docs = helm.template("--set", "watch.clusterWide=true")
    assert "--all-namespaces" in container(docs)["args"]
    assert not by_kind(docs, "RoleBinding") and not by_kind(docs, "KopfPeering")
    assert one(docs, "ClusterKopfPeering")["metadata"]["name"] == "lc-longcat-operator"
    bound = {b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding")}
    assert bound == {"lc-longcat-operator-jobs", "lc-longcat-operator-cluster"}


def test_cert_manager_issues_the_webhook_certificate_when_present(helm: Helm) -> None:
    docs = helm.template("--set", "webhook.enabled=true", "--api-versions", "cert-manager.io/v1")
    assert not by_kind(docs, "Secret")
    certificate = one(docs, "Certificate")
    assert certificate["spec"]["secretName"] == "lc-longcat-operator-webhook-tls"
    assert certificate["spec"]["issuerRef"]["name"] == one(docs, "Issuer")["metadata"]["name"]
    configuration = one(docs, "ValidatingWebhookConfiguration")
    assert configuration["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == (
        f"{RELEASE_NS}/lc-longcat-operator-webhook")


def test_the_webhook_may_review_access_and_the_allow_list_reaches_the_operator(helm: Helm) -> None:
    docs = helm.template("--set", "webhook.enabled=true",
                         "--set", "s3.allowedEndpoints={http://minio.storage:9000,https://s3.example.com}")
    cluster_role = next(d for d in by_kind(docs, "ClusterRole") if d["metadata"]["name"].endswith("-cluster"))
    assert {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
            "verbs": ["create"]} in cluster_role["rules"]
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LONGCAT_ALLOWED_S3_ENDPOINTS"] == "http://minio.storage:9000,https://s3.example.com"
    plain = helm.template()
    assert "LONGCAT_ALLOWED_S3_ENDPOINTS" not in json.dumps(plain)  # default: the default endpoint and AWS only
    assert "subjectaccessreviews" not in json.dumps(plain)  # no webhook, no access reviews


@pytest.mark.parametrize("values, field", [
    (["--set", "replicaCount=two"], "/replicaCount"),
    (["--set", "s3.allowedEndpoints={minio:9000}"], "/s3/allowedEndpoints/0"),
    (["--set-string", "watch.clusterWide=yes"], "/watch/clusterWide"),
    (["--set", "metrics.port=70000"], "/metrics/port"),
    (["--set", "trainer.defaultS3Endpoint=minio:9000"], "/trainer/defaultS3Endpoint"),
    (["--set", "replicas=2"], "replicas"),  # a misspelt key is refused too, not silently ignored
])
def test_schema_rejects_wrong_values_naming_them(helm: Helm, values: list[str], field: str) -> None:
    result = helm("template", "lc", str(CHART), *values, check=False)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr and field in result.stderr


# --- against the real control plane ------------------------------------------------------------------------------


@pytest.fixture
def installed(cluster: Cluster, helm: Helm, namespace: str) -> Iterator[tuple[Helm, str, str]]:
    """The chart installed into `namespace` (watching it and one more namespace); uninstalled afterwards."""
    other = f"{namespace}-b"
    cluster.kubectl("create", "namespace", other)
    release = f"lc{uuid.uuid4().hex[:6]}"
    bound = helm.on(cluster)
    bound("install", release, str(CHART), "--namespace", namespace, "--set", f"watch.namespaces={{{other}}}")
    try:
        yield bound, release, other
    finally:
        bound("uninstall", release, "--namespace", namespace, check=False)
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def can(cluster: Cluster, account: str, verb: str, resource: str, namespace: str | None, *extra: str) -> bool:
    where = ["-n", namespace] if namespace else []
    result = cluster.kubectl("auth", "can-i", verb, resource, *where, *extra, f"--as={account}", check=False)
    assert result.stdout.strip() in ("yes", "no"), result.stdout + result.stderr
    return result.stdout.strip() == "yes"


# What the operator does (kube.py, kopf's status patches, events and peering) in each namespace it watches.
NEEDED = [
    ("get", "longcati2vjobs.longcat.video"), ("list", "longcati2vjobs.longcat.video"),
    ("watch", "longcati2vjobs.longcat.video"), ("patch", "longcati2vjobs.longcat.video"),
    ("patch", "longcati2vjobs.longcat.video", "--subresource=status"),
    ("create", "jobs.batch"), ("get", "jobs.batch"), ("list", "jobs.batch"), ("delete", "jobs.batch"),
    ("patch", "jobs.batch"),
    ("create", "configmaps"), ("get", "configmaps"), ("create", "services"), ("get", "services"),
    # A finished job's ttlSecondsAfterFinished deletes its gang's ConfigMap and Service.
    ("delete", "configmaps"), ("delete", "services"),
    ("get", "pods"), ("list", "pods"), ("get", "secrets"), ("create", "events"),
    ("patch", "kopfpeerings.kopf.dev"), ("watch", "kopfpeerings.kopf.dev"),
]
# What it never needs, in a namespace it watches.
REFUSED = [
    ("list", "secrets"), ("watch", "secrets"), ("create", "secrets"), ("create", "pods"),
    ("create", "pods", "--subresource=exec"), ("delete", "pods"), ("update", "configmaps"),
    ("create", "longcati2vjobs.longcat.video"), ("delete", "longcati2vjobs.longcat.video"),
    ("create", "roles.rbac.authorization.k8s.io"), ("create", "rolebindings.rbac.authorization.k8s.io"),
    ("update", "deployments.apps"), ("create", "serviceaccounts/token"),
]


@pytest.mark.cluster
def test_install_and_server_side_dry_run_of_every_object(cluster: Cluster, installed, namespace: str) -> None:
    helm, release, other = installed
    status = json.loads(helm("status", release, "--namespace", namespace, "-o", "json").stdout)
    assert status["info"]["status"] == "deployed"
    deployment = json.loads(cluster.kubectl("get", "deployment", f"{release}-longcat-operator", "-n", namespace,
                                            "-o", "json").stdout)
    assert deployment["spec"]["replicas"] == 2
    cluster.kubectl("get", "kopfpeering", f"{release}-longcat-operator", "-n", other)
    cluster.kubectl("get", "crd", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev",
                    "longcati2vjobs.longcat.video")
    assert "kubectl -n" in status["info"]["notes"]  # NOTES.txt tells what to do next

    # Every object of the other configurations, as the real API server would admit it (schemas, defaults,
    # admission). Prometheus Operator and cert-manager kinds are left out: their CRDs are not installed here.
    for values in ([], NON_DEFAULT, ["--set", "watch.clusterWide=true", "--set", "webhook.enabled=true"]):
        rendered = helm("template", f"dry{uuid.uuid4().hex[:6]}", str(CHART), "--namespace", namespace,
                        *values).stdout
        docs = [d for d in yaml.safe_load_all(rendered)
                if d and d["kind"] not in ("ServiceMonitor", "PodMonitor") and d["metadata"].get("namespace") in
                (None, namespace)]
        result = cluster.kubectl("create", "--dry-run=server", "-o", "name", "-f", "-",
                                 input="\n---\n".join(yaml.safe_dump(d) for d in docs))
        assert len(result.stdout.split()) == len(docs)


@pytest.mark.cluster
def test_service_account_can_do_what_the_operator_needs_and_no_more(cluster: Cluster, installed, namespace) -> None:
    helm, release, other = installed
    account = f"system:serviceaccount:{namespace}:{release}-longcat-operator"
    unwatched = f"{namespace}-c"
    cluster.kubectl("create", "namespace", unwatched)
    try:
        for where in (namespace, other):
            missing = [check for check in NEEDED if not can(cluster, account, check[0], check[1], where, *check[2:])]
            assert not missing, f"the operator cannot do these in {where}: {missing}"
            allowed = [check for check in REFUSED if can(cluster, account, check[0], check[1], where, *check[2:])]
            assert not allowed, f"the operator may do these in {where} but never needs to: {allowed}"
        # Outside the namespaces it watches: nothing, Secrets included.
        for verb, resource in (("get", "secrets"), ("get", "longcati2vjobs.longcat.video"), ("create", "jobs.batch"),
                               ("patch", "kopfpeerings.kopf.dev")):
            assert not can(cluster, account, verb, resource, unwatched), f"{verb} {resource} in {unwatched}"
        # Cluster-wide: only watching CRDs and namespace names (kopf does); no RBAC changes, no cluster peering.
        for resource in ("customresourcedefinitions.apiextensions.k8s.io", "namespaces"):
            assert can(cluster, account, "watch", resource, None), f"watch {resource}"
        for verb, resource in (("create", "clusterroles.rbac.authorization.k8s.io"),
                               ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
                               ("escalate", "clusterroles.rbac.authorization.k8s.io"),
                               ("patch", "clusterkopfpeerings.kopf.dev"), ("delete", "namespaces"),
                               ("delete", "customresourcedefinitions.apiextensions.k8s.io")):
            assert not can(cluster, account, verb, resource, None), f"{verb} {resource} cluster-wide"
    finally:
        cluster.kubectl("delete", "namespace", unwatched, "--wait=false", check=False)


@pytest.mark.cluster
def test_cluster_wide_install_reads_secrets_everywhere(cluster: Cluster, helm: Helm, namespace: str) -> None:
    bound = helm.on(cluster)
    release = f"cw{uuid.uuid4().hex[:6]}"
    bound("install", release, str(CHART), "--namespace", namespace, "--set", "watch.clusterWide=true")
    try:
        account = f"system:serviceaccount:{namespace}:{release}-longcat-operator"
        assert can(cluster, account, "get", "secrets", "kube-system")
        assert can(cluster, account, "patch", "clusterkopfpeerings.kopf.dev", None)
        assert not can(cluster, account, "list", "secrets", "kube-system")
        cluster.kubectl("get", "clusterkopfpeering", f"{release}-longcat-operator")
    finally:
        bound("uninstall", release, "--namespace", namespace, check=False)


@pytest.mark.cluster
def test_helm_install_refuses_a_wrong_value(cluster: Cluster, helm: Helm, namespace: str) -> None:
    bound = helm.on(cluster)
    result = bound("install", "bad", str(CHART), "--namespace", namespace, "--set-string", "replicaCount=two",
                   check=False)
    assert result.returncode != 0 and "/replicaCount" in result.stderr
    assert bound("list", "--namespace", namespace, "-q").stdout.strip() == ""


def start_replica(deployment: dict[str, Any], kubeconfig: Path, log: Path) -> subprocess.Popen:
    """One operator replica as the chart's Deployment runs it (its args), here as a local process."""
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    health = f"127.0.0.1:{free_port()}"
    args = [re.sub(r"0\.0\.0\.0:\d+", health, a) for a in args]
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "LONGCAT_OPERATOR_METRICS_PORT": "0",
           "LONGCAT_PROGRESS_INTERVAL_S": "1"}
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "longcat_operator", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)


@pytest.mark.cluster
@pytest.mark.s3
def test_two_replicas_under_the_charts_service_account_elect_one_leader(
    cluster: Cluster, installed, namespace: str, s3_server, s3_bucket, tmp_path: Path
) -> None:
    """Two replicas of `python -m longcat_operator`, with the Deployment's args and the ServiceAccount's own
    token: one works and one stands by (kopf peering), and the standby takes over when the leader stops.
    RBAC that misses a verb the operator uses fails here, not in a user's cluster."""
    from tests.fixtures.operator import apply_job, credentials_and_data, phase_is, s3_job, wait_for

    helm, release, other = installed
    name = f"{release}-longcat-operator"
    token = cluster.kubectl("create", "token", name, "-n", namespace).stdout.strip()
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": "operator", "user": {"token": token}}]
    config["contexts"][0]["context"]["user"] = "operator"
    kubeconfig = tmp_path / "operator.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    deployment = json.loads(cluster.kubectl("get", "deployment", name, "-n", namespace, "-o", "json").stdout)
    logs = [tmp_path / "replica-0.log", tmp_path / "replica-1.log"]
    replicas = [start_replica(deployment, kubeconfig, log) for log in logs]

    def text(log: Path) -> str:
        return log.read_text(errors="replace")

    try:
        # Both announce themselves in the peering object; the higher priority works, the other stands by.
        priorities = [int(wait_for(f"{log.name}'s priority", lambda log=log: re.search(
            r"peering with priority (\d+)", text(log)), timeout=60).group(1)) for log in logs]
        wait_for("both replicas in the KopfPeering", lambda: len(json.loads(cluster.kubectl(
            "get", "kopfpeering", name, "-n", other, "-o", "json").stdout).get("status") or {}) == 2)
        leader = priorities.index(max(priorities))
        standby = 1 - leader
        credentials_and_data(cluster, other, s3_server, s3_bucket)

        def launches(job: str, log: Path) -> dict[str, Any]:
            apply_job(cluster, other, s3_job(job, s3_server, s3_bucket))
            try:
                status = wait_for(f"{job} Launching", phase_is(cluster, other, job, "Launching"), timeout=90)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\nlog of the replica expected to act:\n{text(log)[-4000:]}") from None
            assert f"launched {other}/{job}" in text(log)
            return status

        assert launches("first", logs[leader])["conditions"][-1]["reason"] == "GangCreated"
        assert "launched" not in text(logs[standby])

        replicas[leader].terminate()  # a stopping replica leaves the peering object, so the standby resumes
        replicas[leader].wait(timeout=30)
        launches("second", logs[standby])
        cluster.kubectl("get", "job", "first-a0", "second-a0", "-n", other)
        for log in logs:
            assert "Forbidden" not in text(log), text(log)[-4000:]
    finally:
        for replica in replicas:
            replica.terminate()
            replica.wait(timeout=30)
