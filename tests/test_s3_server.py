"""The S3 test server itself: signatures checked, loopback only, stop and restart keep data."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from longcat_job.s3 import S3Credentials
from tests.fixtures.s3 import S3Server

pytestmark = pytest.mark.s3


def _listening_addresses(pid: int) -> set[str]:
    """Local addresses of the process's listening TCP sockets, from /proc."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile: the server opens and closes files all the time
            continue
        if m := re.fullmatch(r"socket:\[(\d+)\]", target):
            inodes.add(m.group(1))
    addresses = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addresses.add(fields[1].split(":")[0])
    return addresses


def test_wrong_secret_is_refused(s3_server: S3Server, s3_bucket: str) -> None:
    s3_server.client().put_object(Bucket=s3_bucket, Key="a.txt", Body=b"x")
    forged = S3Credentials(access_key_id=s3_server.credentials.access_key_id, secret_access_key="not-the-secret")
    with pytest.raises(ClientError) as caught:
        s3_server.client(forged).get_object(Bucket=s3_bucket, Key="a.txt")
    assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_listens_on_loopback_only_with_telemetry_off(s3_server: S3Server) -> None:
    assert "-master.telemetry=false" in s3_server.command()
    addresses = _listening_addresses(s3_server._process.pid)
    assert addresses == {"0100007F"}, f"weed listens beyond 127.0.0.1: {addresses}"


def test_stop_and_restart_keep_objects(s3_server_private: S3Server) -> None:
    server = s3_server_private
    bucket = server.create_bucket()
    server.client().put_object(Bucket=bucket, Key="kept", Body=b"still here")
    server.stop()
    assert not server.running
    with pytest.raises(EndpointConnectionError):
        server.client(max_attempts=1, connect_timeout=1).list_buckets()
    server.start()
    assert server.client().get_object(Bucket=bucket, Key="kept")["Body"].read() == b"still here"
