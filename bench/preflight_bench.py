"""Preflight of 20,000 pairs (20,000 clips + 20,000 captions + 20,000 start frames) against a local S3 server.

Starts SeaweedFS as the tests do, uploads the dataset concurrently (setup, timed apart), then times the
shallow preflight of a job with one video dataset and its start frames. The aim is under 20 s.

    .venv/bin/python bench/preflight_bench.py [--pairs 20000] [--repeats 3] [--upload-workers 32]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from longcat_job.api import JobSpec  # noqa: E402
from longcat_job.preflight import run_preflight  # noqa: E402
from tests.fixtures.s3 import S3Server  # noqa: E402


def upload(server: S3Server, bucket: str, pairs: int, workers: int) -> None:
    client = server.client()
    keys = []
    for i in range(pairs):
        stem = f"clip{i:06d}"
        keys += [(f"train/{stem}.mp4", b"clip"), (f"train/{stem}.txt", b"a caption"), (f"frames/{stem}.png", b"png")]
    done = 0
    lock = threading.Lock()
    start = last = time.monotonic()

    def put(item: tuple[str, bytes]) -> None:
        nonlocal done, last
        client.put_object(Bucket=bucket, Key=item[0], Body=item[1])
        with lock:
            done += 1
            now = time.monotonic()
            if now - last >= 5:
                last = now
                rate = done / (now - start)
                print(f"  uploaded {done}/{len(keys)} ({rate:.0f}/s, ETA {(len(keys) - done) / rate:.0f}s)", flush=True)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(put, keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--upload-workers", type=int, default=32)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="  %(message)s")

    with tempfile.TemporaryDirectory(prefix="preflight-bench-") as tmp:
        server = S3Server(Path(tmp))
        server.start()
        try:
            bucket = server.create_bucket("preflight-bench")
            objects = 3 * args.pairs
            print(f"setup: uploading {objects} objects with {args.upload_workers} threads", flush=True)
            t0 = time.monotonic()
            upload(server, bucket, args.pairs, args.upload_workers)
            setup_s = time.monotonic() - t0
            print(f"setup: {setup_s:.1f}s ({objects / setup_s:.0f} objects/s)", flush=True)

            source = {"bucket": bucket, "endpoint": server.endpoint}
            spec = JobSpec.model_validate({
                "datasets": [
                    {"id": "train", "type": "video", "isI2V": True, "captionStrategy": "textfile",
                     "conditioningData": ["frames"], "source": {"s3": {**source, "prefix": "train/"}}},
                    {"id": "frames", "type": "conditioning", "source": {"s3": {**source, "prefix": "frames/"}}},
                ],
                "output": {"s3": {**source, "prefix": "out/"}},
            })
            times = []
            for i in range(args.repeats):
                t0 = time.monotonic()
                result = run_preflight(spec, credentials=lambda _name: server.credentials)
                times.append(time.monotonic() - t0)
                train = result.report.dataset("train")
                assert result.report.ok and train.samples == args.pairs, result.report.lines()
                print(f"preflight run {i + 1}: {times[-1]:.2f}s, {train.samples} complete samples", flush=True)
            figures = {
                "pairs": args.pairs,
                "objects": objects,
                "setup_s": round(setup_s, 1),
                "preflight_s_median": round(statistics.median(times), 2),
                "preflight_s_min": round(min(times), 2),
                "objects_per_s": round(objects / statistics.median(times)),
            }
            print(json.dumps(figures))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
