"""`longcat-i2v serve` in a cluster's place: the LongCatI2VJobs of the real API server and a folder of jobs in
the real S3 server, every object streamed through the server (ranges included), no credential in a page."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.fixtures.cluster import Cluster, free_port
from tests.fixtures.operator import apply_job, s3_job, write_progress
from tests.fixtures.s3 import SECRET_KEY, S3Server

CLI = str(Path(sys.executable).with_name("longcat-i2v"))

pytestmark = [pytest.mark.cluster, pytest.mark.s3]


def get(url: str, **headers: str) -> tuple[int, Message, bytes]:
    """Status, headers (names in any case) and body."""
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
        return response.status, response.headers, response.read()


@pytest.fixture
def serving(crd_installed: Cluster, namespace: str, s3_server: S3Server, s3_bucket: str,
            tmp_path: Path) -> Iterator[str]:
    apply_job(crd_installed, namespace, s3_job("ui-a", s3_server, s3_bucket))
    crd_installed.kubectl("patch", "lcj", "ui-a", "-n", namespace, "--subresource=status", "--type=merge",
                          "-p", json.dumps({"status": {"phase": "Training", "restarts": 1}}))
    write_progress(s3_server, s3_bucket, "ui-a", "Training", 4)
    credentials = s3_server.credentials
    env = {**os.environ, "KUBECONFIG": str(crd_installed.kubeconfig), "AWS_ENDPOINT_URL": s3_server.endpoint,
           "AWS_ACCESS_KEY_ID": credentials.access_key_id,
           "AWS_SECRET_ACCESS_KEY": credentials.secret_access_key.get_secret_value()}
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen([CLI, "serve", "--cluster", "--output", f"s3://{s3_bucket}/out", "--port", str(port)],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            get(url)
            break
        except OSError:
            assert process.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
    yield url
    process.terminate()
    process.wait(timeout=10)
    log.close()


def test_the_cluster_s_jobs_and_the_bucket_s_folder_of_jobs_are_listed(
    serving: str, namespace: str, s3_server: S3Server, s3_bucket: str
) -> None:
    _, _, body = get(serving)
    page = body.decode()
    # From the bucket's folder of jobs (out/<name>/progress.json), and from the API server (restarts
    # from the job's status, step and ETA from its output's progress.json).
    rows = {row.split("</a>")[0].rsplit(">", 1)[1]: row for row in page.split("<tr class='job'>")[1:]}
    assert set(rows) == {"ui-a", f"{namespace}:ui-a"}
    cluster_row = rows[f"{namespace}:ui-a"]
    assert "<td>Training</td><td>4/10</td><td>725 s</td><td>1</td>" in cluster_row
    assert "<td>Training</td><td>4/10</td><td>725 s</td><td>-</td>" in rows["ui-a"]
    assert SECRET_KEY not in page and "X-Amz-Signature" not in page

    stored = s3_server.client().get_object(Bucket=s3_bucket, Key="out/ui-a/progress.json")["Body"].read()
    for job_id in ("ui-a", f"{namespace}:ui-a"):
        url = f"{serving}/jobs/{quote(job_id, safe='')}/files/progress.json"
        assert get(url)[2] == stored
        status, headers, part = get(url, Range="bytes=5-14")
        assert status == 206 and part == stored[5:15]
        assert headers["Content-Range"] == f"bytes 5-14/{len(stored)}"
    _, _, job_page = get(f"{serving}/jobs/{quote(namespace + ':ui-a', safe='')}")
    assert "Training" in job_page.decode() and SECRET_KEY not in job_page.decode()
