"""Apply N LongCatI2VJobs at once against a local control plane and S3; time creation -> Job created.

Starts the test suite's real control plane (etcd, kube-apiserver, kube-controller-manager) and SeaweedFS, one
small paired dataset, and the operator as its own process (`kopf run`, as in a pod). It then creates N jobs as
fast as the API accepts them, watches Jobs appear, and prints p50/p99/max latency from each job's creation
(the moment its create call returned) to its Job being seen, the time until all N have one, and the operator's
resident memory afterwards. `--failing K` makes K of the jobs' gangs fail once (pods patched to Failed) so that
their restarts run while the others launch; their statuses are checked at the end.

    .venv/bin/python bench/operator_bench.py [--jobs 200] [--failing 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
from kubernetes import client, config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from longcat_operator.gang import LABEL_ATTEMPT, LABEL_JOB  # noqa: E402
from tests.fixtures.cluster import start_control_plane  # noqa: E402
from tests.fixtures.operator import CRD_PATH, SECRET, put_dataset, s3_job, s3_secret  # noqa: E402
from tests.fixtures.s3 import running_s3  # noqa: E402

NAMESPACE = "bench"
POLL_S = 0.1


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_seconds() -> dict[str, float]:
    """CPU time (user + system) of this process and each process it started, by program name."""
    found: collections.Counter = collections.Counter()
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
            command = process.cmdline()
        except psutil.NoSuchProcess:
            continue
        name = "operator" if "longcat_operator.reconcile" in command else Path(command[0]).name if command else "?"
        found["bench" if process.pid == me.pid else name] += times.user + times.system
    return dict(found)


def api_requests(cluster) -> collections.Counter:
    """The API server's own count of the requests it served, by (verb, resource), from its /metrics."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    counts: collections.Counter = collections.Counter()
    for line in text.splitlines():
        if line.startswith("apiserver_request_total{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            counts[(labels.get("verb", ""), labels.get("resource", ""))] += int(float(line.rsplit(" ", 1)[1]))
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--failing", type=int, default=0, help="gangs made to fail once while the rest launch")
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="longcat-bench-"))
        t0 = time.monotonic()
        cluster = start_control_plane(stack, workdir)
        print(f"control plane ready in {time.monotonic() - t0:.1f}s")
        s3 = stack.enter_context(running_s3(workdir / "s3"))
        bucket = s3.create_bucket("bench")
        put_dataset(s3, bucket, [f"clip{i:02d}" for i in range(8)])

        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / CRD_PATH))
        cluster.kubectl("wait", "--for=condition=Established", "crd/longcati2vjobs.longcat.video")
        cluster.kubectl("create", "namespace", NAMESPACE)
        creds = s3.credentials
        s3_secret(cluster, NAMESPACE, SECRET, creds.access_key_id, creds.secret_access_key.get_secret_value())

        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "LONGCAT_PROGRESS_INTERVAL_S": "2"}
        log = (workdir / "operator.log").open("w")
        operator = subprocess.Popen(
            [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "-m",
             "longcat_operator.reconcile"], env=env, stdout=log, stderr=subprocess.STDOUT)
        stack.callback(operator.wait)
        stack.callback(operator.terminate)
        config.load_kube_config(config_file=str(cluster.kubeconfig))
        custom, batch, core = client.CustomObjectsApi(), client.BatchV1Api(), client.CoreV1Api()
        time.sleep(3)  # the operator's first API scan and watch

        seen: dict[str, float] = {}
        done = threading.Event()

        def poll_jobs() -> None:
            # Polling every 0.1 s bounds the error of each latency by 0.1 s (a watch of a fresh namespace
            # can be refused with "too large resource version" while the watch cache catches up).
            while not done.is_set():
                for job in batch.list_namespaced_job(NAMESPACE).items:
                    seen.setdefault(job.metadata.labels[LABEL_JOB], time.monotonic())
                time.sleep(POLL_S)

        before = api_requests(cluster)
        cpu_before = cpu_seconds()
        watcher = threading.Thread(target=poll_jobs, daemon=True)
        watcher.start()
        created: dict[str, float] = {}
        start = time.monotonic()
        for i in range(args.jobs):
            name = f"job-{i:04d}"
            custom.create_namespaced_custom_object("longcat.video", "v1alpha1", NAMESPACE, "longcati2vjobs",
                                                   s3_job(name, s3, bucket, nodes=1, maxRestarts=2))
            created[name] = time.monotonic()
        print(f"created {args.jobs} jobs in {time.monotonic() - start:.1f}s")

        failing = list(created)[:: max(1, args.jobs // max(1, args.failing))][: args.failing]
        failed: set[str] = set()
        deadline = time.monotonic() + args.timeout
        while (len(seen) < args.jobs or len(failed) < len(failing)) and time.monotonic() < deadline:
            for name in failing:
                if name in seen and name not in failed:
                    pods = core.list_namespaced_pod(NAMESPACE, label_selector=f"{LABEL_JOB}={name},{LABEL_ATTEMPT}=0")
                    for pod in pods.items:
                        core.patch_namespaced_pod_status(pod.metadata.name, NAMESPACE, {"status": {"phase": "Failed"}})
                        failed.add(name)
            time.sleep(0.2)
        done.set()
        all_in = max(seen.values()) - start if seen else float("nan")
        latencies = [seen[name] - created[name] for name in created if name in seen]
        print(f"jobs with a Job: {len(seen)}/{args.jobs}; all within {all_in:.1f}s of the first create")
        print(f"creation -> Job created: p50 {statistics.median(latencies):.2f}s, "
              f"p90 {percentile(latencies, 0.9):.2f}s, p99 {percentile(latencies, 0.99):.2f}s, "
              f"max {max(latencies):.2f}s")
        cpu = {name: seconds - cpu_before.get(name, 0.0) for name, seconds in cpu_seconds().items()}
        print(f"CPU seconds while launching ({all_in:.0f} s on {os.cpu_count()} cores): " + ", ".join(
            f"{name} {seconds:.1f}" for name, seconds in sorted(cpu.items(), key=lambda kv: -kv[1]) if seconds >= 0.5))
        served = api_requests(cluster) - before
        ours = {key: n for key, n in served.items() if key[1] in (
            "longcati2vjobs", "jobs", "pods", "configmaps", "services", "secrets", "events")}
        # The bench's own polling (list jobs every 0.1 s) and pod patches are in these counts too.
        print("API requests per job while launching (verb resource: count/job): " + ", ".join(
            f"{verb} {resource}: {n / args.jobs:.1f}" for (verb, resource), n in sorted(ours.items())))

        if failing:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                restarts = {n: custom.get_namespaced_custom_object_status(
                    "longcat.video", "v1alpha1", NAMESPACE, "longcati2vjobs", n).get("status", {}).get("restarts", 0)
                    for n in failing}
                if all(r == 1 for r in restarts.values()):
                    break
                time.sleep(1)
            print(f"restarted gangs: {restarts}")
            others = [n for n in created if n not in failing]
            phases = {}
            for n in others:
                obj = custom.get_namespaced_custom_object("longcat.video", "v1alpha1", NAMESPACE, "longcati2vjobs", n)
                phases[n] = (obj.get("status", {}).get("phase"), obj.get("status", {}).get("restarts", 0))
            wrong = {n: p for n, p in phases.items() if p != ("Launching", 0)}
            print(f"other jobs with an unexpected status: {len(wrong)} {json.dumps(dict(list(wrong.items())[:5]))}")
        reasons = collections.Counter(e.reason for e in core.list_namespaced_event(NAMESPACE).items
                                      if e.involved_object.kind == "LongCatI2VJob")
        print(f"events on the jobs by reason: {dict(reasons.most_common())}")
        print(f"operator resident memory: {rss_mib(operator.pid):.0f} MiB")
        log.close()


if __name__ == "__main__":
    main()
