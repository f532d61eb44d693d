"""The path a user pays for, through real pods on a real node (tests/fixtures/node.py):

helm install the chart -> the operator runs as a pod of its image -> kubectl apply a job -> the trainer image's
torchrun runs in a pod -> LoRA, videos and report in S3. Then the same with the trainer's container killed
mid-run (the gang restarts and resumes), and with the job deleted while it trains (the trainer checkpoints).

Every container here is real: its log lines come from `kubectl logs` and its exit code from the kubelet's
pod status. The job uses a tiny model and three 9-frame clips, so the pods train on the CPU in about a minute.
"""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import pytest

from longcat_job.api import Location
from longcat_job.progress import PROGRESS_KEY, TrainerProgress
from longcat_job.storage import store_for
from longcat_operator.gang import LABEL_ATTEMPT, LABEL_JOB
from longcat_trainer.data.synthetic import write_shapes_dataset
from longcat_trainer.model.tiny import write_tiny_checkpoint
from tests.fixtures.cluster import Cluster
from tests.fixtures.helm import CHART, RELEASE_NS, Helm
from tests.fixtures.node import Node
from tests.fixtures.s3 import S3Server

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.s3, pytest.mark.timeout(3600)]

SECRET = "s3-credentials"
MODEL_BUCKET = "e2e-models"
MODEL_CACHE_CLAIM = "models"
TRAINER_UID = 10001


@dataclass(frozen=True)
class Setup:
    node: Node
    s3: S3Server
    bucket: str

    @property
    def cluster(self) -> Cluster:
        return self.node.cluster

    def kubectl(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        return self.cluster.kubectl("-n", RELEASE_NS, *args, check=check, timeout=timeout).stdout

    def get(self, *args: str) -> dict[str, Any] | None:
        result = self.cluster.kubectl("-n", RELEASE_NS, "get", *args, "-o", "json", check=False)
        return json.loads(result.stdout) if result.returncode == 0 else None

    def output(self, name: str):
        location = {"s3": {"bucket": self.bucket, "prefix": f"out/{name}/", "endpoint": self.s3.endpoint}}
        return store_for(Location.model_validate(location), what="e2e output",
                         credentials=lambda _: self.s3.credentials)

    def progress(self, name: str) -> TrainerProgress | None:
        try:
            return TrainerProgress.from_json(self.output(name).get_bytes(PROGRESS_KEY))
        except Exception:  # not written yet
            return None

    @property
    def secret_value(self) -> str:
        return self.s3.credentials.secret_access_key.get_secret_value()

    def diagnostics(self) -> str:
        """What a person would look at when the path breaks: objects, statuses, events, the operator's log."""
        parts = [self.kubectl("get", "lcj,jobs,pods", "-o", "wide", check=False)]
        for item in (self.get("lcj") or {}).get("items", []):
            parts.append(f"{item['metadata']['name']} status: {json.dumps(item.get('status', {}))[:3000]}")
        parts.append(self.kubectl("get", "events", "--sort-by=.lastTimestamp", check=False)[-4000:])
        operator_log = self.kubectl("logs", "-l", "app.kubernetes.io/name=longcat-operator", "--tail=400", check=False)
        parts.append("\n".join([line for line in operator_log.splitlines() if "GET /healthz" not in line][-60:]))
        for component in ("kubelet", "containerd"):
            log = self.node.workdir / f"{component}.log"
            lines = log.read_text(errors="replace").splitlines() if log.exists() else []
            errors = [line for line in lines if " E1" in line or "level=error" in line]
            parts.append(f"--- {component} errors:\n" + "\n".join(errors[-15:]))
        return "\n".join(parts)

    def wait_for(self, what: str, probe: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = probe()
            if last:
                return last
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}\n"
                             f"{self.diagnostics()}")


def upload_dir(s3: S3Server, bucket: str, prefix: str, root: Path) -> None:
    client = s3.client()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(root).as_posix()}", Body=path.read_bytes())


@pytest.fixture(scope="module")
def setup(e2e_node: tuple[Node, S3Server], helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """The chart installed with the images built from the Dockerfiles, a tiny model and a paired dataset in S3."""
    node, s3 = e2e_node
    bucket = s3.create_bucket("e2e")
    model = tmp_path_factory.mktemp("model") / "tiny"
    write_tiny_checkpoint(model)
    # The model has a bucket of its own: the server's per-bucket GET count tells what the model cache saved.
    upload_dir(s3, s3.create_bucket(MODEL_BUCKET), "model", model)
    data = store_for(Location.model_validate({"s3": {"bucket": bucket, "prefix": "data/", "endpoint": s3.endpoint}}),
                     what="e2e data", credentials=lambda _: s3.credentials)
    write_shapes_dataset(data, count=3, frames=9, height=64, width=112)

    cluster = node.cluster
    cluster.kubectl("create", "namespace", RELEASE_NS)
    credentials = {"AWS_ACCESS_KEY_ID": s3.credentials.access_key_id,
                   "AWS_SECRET_ACCESS_KEY": s3.credentials.secret_access_key.get_secret_value()}
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": SECRET, "namespace": RELEASE_NS},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in credentials.items()}}))
    repository, tag = node.images.operator.rsplit(":", 1)
    helm.on(cluster)("install", "lc", str(CHART), "--namespace", RELEASE_NS,
                     "--set", f"image.repository={repository}", "--set", f"image.tag={tag}",
                     "--set", "image.pullPolicy=Never", "--set", f"trainer.image={node.images.trainer}",
                     "--set", f"trainer.defaultS3Endpoint={s3.endpoint}", "--set", "replicaCount=1",
                     "--set", "extraEnv[0].name=LONGCAT_PROGRESS_INTERVAL_S", "--set-string", "extraEnv[0].value=2")
    # The model cache: a volume on the node (world-writable: fsGroup does not apply to hostPath) and its claim.
    cache = tmp_path_factory.mktemp("model-cache")
    cache.chmod(0o777)
    cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": f"{RELEASE_NS}-{MODEL_CACHE_CLAIM}"},
         "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteMany"], "storageClassName": "manual",
                  "hostPath": {"path": str(cache), "type": "Directory"}}},
        {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
         "metadata": {"name": MODEL_CACHE_CLAIM, "namespace": RELEASE_NS},
         "spec": {"accessModes": ["ReadWriteMany"], "storageClassName": "manual",
                  "volumeName": f"{RELEASE_NS}-{MODEL_CACHE_CLAIM}", "resources": {"requests": {"storage": "1Gi"}}}},
    ]}))
    setup = Setup(node, s3, bucket)
    setup.wait_for("the operator's pod Ready", lambda: _ready_pods(setup, "app.kubernetes.io/name=longcat-operator"),
             timeout=180)
    yield setup
    helm.on(cluster)("uninstall", "lc", "--namespace", RELEASE_NS, check=False)


def _ready_pods(setup: Setup, selector: str) -> list[dict[str, Any]]:
    pods = (setup.get("pods", "-l", selector) or {}).get("items", [])
    return [p for p in pods if any(c["type"] == "Ready" and c["status"] == "True"
                                   for c in p["status"].get("conditions", []))]


def job(setup: Setup, name: str, **training: Any) -> dict[str, Any]:
    """A tiny job on the dataset and model of `setup`; S3 endpoints come from the chart's default."""
    def where(prefix: str) -> dict[str, Any]:
        return {"s3": {"bucket": setup.bucket, "prefix": prefix, "credentialsSecret": SECRET}}

    return {
        "apiVersion": "longcat.video/v1alpha1", "kind": "LongCatI2VJob", "metadata": {"name": name},
        "spec": {
            "model": {"source": f"s3://{MODEL_BUCKET}/model", "storage": {"credentialsSecret": SECRET}},
            "lora": {"rank": 4},
            "training": {"maxSteps": 8, "checkpointEvery": 4, "learningRate": 1e-3, "gradientCheckpointing": False,
                         **training},
            "datasets": [
                {"id": "clips", "type": "video", "isI2V": True, "captionStrategy": "textfile",
                 "source": where("data/clips/"), "conditioningData": ["start-frames"], "resolution": 64, "frames": 9},
                {"id": "start-frames", "type": "conditioning", "source": where("data/start_frames/"),
                 "resolution": 64, "frames": 9},
            ],
            "aspectBucketAlignment": 16,
            "validation": {"resolution": "64x112", "frames": 9, "numInferenceSteps": 2, "maxSamples": 1},
            "output": where(f"out/{name}/"),
            "resources": {"nodes": 1, "gpusPerNode": 1, "shmSize": "256Mi"},
            "maxRestarts": 2,
        },
    }


def apply(setup: Setup, document: dict[str, Any]) -> None:
    setup.cluster.kubectl("-n", RELEASE_NS, "apply", "-f", "-", input=json.dumps(document))


def status(setup: Setup, name: str) -> dict[str, Any]:
    return (setup.get("lcj", name) or {}).get("status", {})


def trainer_pods(setup: Setup, name: str, attempt: int) -> list[dict[str, Any]]:
    return (setup.get("pods", "-l", f"{LABEL_JOB}={name},{LABEL_ATTEMPT}={attempt}") or {}).get("items", [])


def terminated(pod: dict[str, Any]) -> dict[str, Any] | None:
    """How the pod's (only) container ended, as the kubelet reports it."""
    for container in pod["status"].get("containerStatuses", []):
        if "terminated" in container.get("state", {}):
            return container["state"]["terminated"]
    return None


def watch_phases(setup: Setup, name: str, until: set[str], timeout: float) -> list[tuple[str, int]]:
    """(phase, step) as `kubectl get lcj` shows them, each change once, until a phase of `until`."""
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = status(setup, name)
        point = (current.get("phase", "Pending"), current.get("progress", {}).get("step", 0))
        if not seen or seen[-1] != point:
            seen.append(point)
        if point[0] in until:
            return seen
        time.sleep(0.5)
    raise AssertionError(f"{name} did not reach {until} in {timeout:.0f} s; seen {seen}")


def test_a_job_trains_in_a_real_pod_and_leaves_its_lora_in_s3(setup: Setup) -> None:
    started = time.monotonic()
    # Long enough that the operator (reading every 2 s) sees the step between the trainer's forced writes at
    # each checkpoint: 40 tiny steps can pass in under two reads.
    apply(setup, job(setup, "first", maxSteps=80, checkpointEvery=20))
    running = setup.wait_for("the trainer pod running", lambda: [p for p in trainer_pods(setup, "first", 0)
                                                           if p["status"].get("phase") == "Running"], timeout=300)
    pod = running[0]["metadata"]["name"]
    # The container really runs as the image's user, on a read-only root filesystem.
    assert setup.kubectl("exec", pod, "-c", "trainer", "--", "id", "-u").strip() == str(TRAINER_UID)
    probe = setup.cluster.kubectl("-n", RELEASE_NS, "exec", pod, "-c", "trainer", "--", "touch", "/probe",
                                  check=False)
    assert probe.returncode != 0 and "Read-only file system" in probe.stderr, probe

    phases = watch_phases(setup, "first", {"Succeeded", "Failed"}, timeout=600)
    assert phases[-1][0] == "Succeeded", (phases, status(setup, "first"))
    training_steps = [step for phase, step in phases if phase == "Training"]
    assert len(set(training_steps)) >= 2, phases  # the step moved while kubectl showed Training
    table = setup.kubectl("get", "lcj", "first")
    assert "Succeeded" in table and "80/80" in table, table

    final = setup.wait_for("the pod's exit", lambda: terminated(setup.get("pod", pod) or {"status": {}}), timeout=60)
    assert final["exitCode"] == 0, final  # from the kubelet
    logs = setup.kubectl("logs", pod, "-c", "trainer")
    assert "train: " in logs and "steps" in logs and "LoRA written to" in logs, logs[-3000:]

    out = setup.output("first")
    keys = {r.key for r in out.list()}
    for key in ("lora/pytorch_lora_weights.safetensors", "lora/longcat_video_lora.safetensors",
                "lora/adapter_config.json", "index.html", "loss.png", "manifest.json"):
        assert key in keys, sorted(keys)
    videos = [k for k in keys if k.startswith("validation/") and k.endswith(".mp4")]
    assert videos, sorted(keys)
    with av.open(io.BytesIO(out.get_bytes(videos[0]))) as container:
        assert sum(1 for _ in container.decode(video=0)) == 9

    pod_json = json.dumps(setup.get("pod", pod))
    config = json.dumps(setup.get("configmap", "first-config"))
    for place in (pod_json, config, logs, setup.kubectl("logs", "-l", "app.kubernetes.io/name=longcat-operator")):
        assert setup.secret_value not in place
    print(f"e2e first job: {time.monotonic() - started:.0f} s from apply to Succeeded; phases {phases}")


def test_a_killed_trainer_restarts_the_gang_which_resumes_from_its_checkpoint(setup: Setup) -> None:
    interval = 5
    document = job(setup, "killed", maxSteps=30, checkpointEvery=interval)
    document["spec"]["resources"]["modelCache"] = {"claimName": MODEL_CACHE_CLAIM}
    apply(setup, document)
    setup.wait_for("the first checkpoint", lambda: (p := setup.progress("killed")) is not None
             and p.artifacts.latest_checkpoint, timeout=600, interval=0.2)
    model_gets = setup.s3.requests(MODEL_BUCKET, "GET")  # attempt 0 has loaded the model by now
    pod = trainer_pods(setup, "killed", 0)[0]
    container_id = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    setup.node.ctr("tasks", "kill", "--signal", "SIGKILL", container_id)

    gone = setup.wait_for("the killed pod's exit", lambda: terminated(setup.get("pod", pod["metadata"]["name"])
                                                                or {"status": {}}), timeout=120)
    assert gone["exitCode"] == 137, gone  # SIGKILL, as the kubelet saw it
    # The last published checkpoint, read once the trainer is dead. Its successor was not published, so the
    # killed trainer stopped before step latest + interval: resuming from `latest` redoes at most `interval` steps.
    latest = json.loads(setup.output("killed").get_bytes("checkpoints/latest"))["step"]
    assert latest >= interval

    setup.wait_for("the gang restarted", lambda: status(setup, "killed").get("restarts") == 1, timeout=120)
    phases = watch_phases(setup, "killed", {"Succeeded", "Failed"}, timeout=900)
    assert phases[-1][0] == "Succeeded", (phases, status(setup, "killed"))
    restarted = trainer_pods(setup, "killed", 1)[0]["metadata"]["name"]
    logs = setup.kubectl("logs", restarted, "-c", "trainer")
    resumed_from = int(logs.split("resuming from checkpoints/step-", 1)[1][:8])
    assert resumed_from == latest, (latest, resumed_from)
    final = setup.progress("killed")
    assert final.cache.misses == 0 and final.cache.hits > 0, final.cache  # the second attempt's caches all hit
    assert "using the cached copy" in logs and setup.s3.requests(MODEL_BUCKET, "GET") == model_gets  # no download
    events = setup.kubectl("get", "events", "--field-selector", "involvedObject.name=killed", "-o", "json")
    assert '"reason": "GangRestarted"' in events


def test_a_permanent_storage_error_fails_at_once_with_its_reason_from_the_pod(setup: Setup) -> None:
    document = job(setup, "nomodel")
    document["spec"]["model"]["source"] = "s3://no-such-model-bucket/model"
    apply(setup, document)
    phases = watch_phases(setup, "nomodel", {"Succeeded", "Failed"}, timeout=300)
    failed = next(c for c in status(setup, "nomodel")["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "NoSuchBucket" and "'no-such-model-bucket'" in failed["message"], (phases, failed)
    assert status(setup, "nomodel").get("restarts", 0) == 0  # permanent: no restart spent
    pod = trainer_pods(setup, "nomodel", 0)[0]
    message = terminated(pod)["message"]  # what the trainer left in /dev/termination-log, as the kubelet read it
    assert message.startswith("NoSuchBucket: ") and "does not exist" in message
    assert setup.s3.credentials.secret_access_key.get_secret_value() not in message


def test_deleting_a_running_job_stops_its_pods_after_a_checkpoint(setup: Setup) -> None:
    apply(setup, job(setup, "deleted", maxSteps=10_000, checkpointEvery=10_000))
    setup.wait_for("training", lambda: (p := setup.progress("deleted")) is not None and p.phase == "Training"
             and p.progress.step >= 2, timeout=600, interval=0.2)
    pod = trainer_pods(setup, "deleted", 0)[0]["metadata"]["name"]
    began = time.monotonic()
    setup.kubectl("delete", "lcj", "deleted", "--wait=true", timeout=120)
    setup.wait_for("the pods gone", lambda: not trainer_pods(setup, "deleted", 0), timeout=90)
    stopped_in = time.monotonic() - began
    assert stopped_in < 60 + 10, stopped_in  # the pods' grace period, and a margin for the API's own steps
    stopped = setup.progress("deleted")
    assert stopped.phase == "Preempted" and stopped.artifacts.latest_checkpoint, stopped
    keys = {r.key for r in setup.output("deleted").list()}
    assert "manifest.json" in keys and any(k.startswith("checkpoints/step-") for k in keys), sorted(keys)
    assert setup.get("pod", pod) is None


def run_pod(setup: Setup, name: str, image: str, script: str) -> tuple[int, str]:
    """A one-off pod of `image` running `script` in sh; its exit code (from the kubelet) and its log."""
    setup.cluster.kubectl("-n", RELEASE_NS, "apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                 "volumes": [{"name": "tmp", "emptyDir": {}}],
                 "containers": [{"name": "probe", "image": image, "imagePullPolicy": "Never",
                                 "command": ["sh", "-c", script],
                                 "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                                 "securityContext": {"readOnlyRootFilesystem": True,
                                                     "allowPrivilegeEscalation": False}}]}}))
    ended = setup.wait_for(f"pod {name} to end", lambda: terminated(setup.get("pod", name) or {"status": {}}),
                           timeout=180)
    return ended["exitCode"], setup.kubectl("logs", name)


def test_each_image_holds_what_it_runs_and_nothing_of_the_other(setup: Setup) -> None:
    code, log = run_pod(setup, "operator-image", setup.node.images.operator, """
        python -c "import importlib.util as u, json, longcat_operator.reconcile; print(json.dumps({
            'torch': u.find_spec('torch') is not None, 'trainer': u.find_spec('longcat_trainer') is not None,
            'uid': __import__('os').getuid()}))" && python -m longcat_operator --help | grep -c -- --peering""")
    assert code == 0, log
    found, peering = log.strip().splitlines()[-2:]
    assert json.loads(found) == {"torch": False, "trainer": False, "uid": TRAINER_UID} and int(peering) >= 1, log

    code, log = run_pod(setup, "trainer-image", setup.node.images.trainer, """
        python -c "import importlib.util as u, json, torch, diffusers, transformers, peft, accelerate, av
import longcat_trainer.train
print(json.dumps({'matmul': float((torch.ones(2, 3) @ torch.ones(3, 2)).sum()),
                  'operator': u.find_spec('longcat_operator') is not None}))"
        command -v torchrun >/dev/null && echo torchrun
        echo '{}' > /tmp/job.json; python -m longcat_trainer --config /tmp/job.json 2>/dev/null; echo "exit $?"
        """)
    assert code == 0, log
    lines = log.strip().splitlines()
    # The trainer refuses a bad job file with the bad-input exit code; the operator starts pods with torchrun.
    assert json.loads(lines[-3]) == {"matmul": 12.0, "operator": False} and lines[-2:] == ["torchrun", "exit 78"], log


def test_a_two_node_gang_meets_through_its_headless_service(setup: Setup) -> None:
    """nodes: 2 on one machine: pod 1's torchrun finds pod 0 as <job>-a0-0.lcj-<job>, through the cluster DNS."""
    document = job(setup, "pair", maxSteps=4, checkpointEvery=4)
    document["spec"]["resources"]["nodes"] = 2
    apply(setup, document)
    phases = watch_phases(setup, "pair", {"Succeeded", "Failed"}, timeout=900)
    assert phases[-1][0] == "Succeeded", (phases, setup.diagnostics())
    pods = sorted(trainer_pods(setup, "pair", 0), key=lambda p: p["metadata"]["name"])
    assert [terminated(p)["exitCode"] for p in pods] == [0, 0]  # both containers, as the kubelet saw them
    second = setup.kubectl("logs", pods[1]["metadata"]["name"], "-c", "trainer")
    assert "rank1 " in second, second[-2000:]
    assert setup.progress("pair").world_size == 2
