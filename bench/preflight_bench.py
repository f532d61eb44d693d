"""Preflight of 20,000 pairs (20,000 clips + 20,000 captions + 20,000 start frames) against a local S3 server.

Starts SeaweedFS as the tests do, uploads the dataset concurrently (setup, timed apart), then times the
preflight of a job with one video dataset and its start frames, shallow (listing and pairing: the aim is under
20 s) and deep (as the operator and `run` do it: each clip's header and first frame, each start frame's header
and each caption read: under 60 s). The clips are real H.264 (9 frames at 112x64) and the start frames real
PNGs: the deep check's cost is its requests, and a small clip's header and first frame come in one GET as a large
faststart clip's do.

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
from longcat_trainer.data.synthetic import ShapeClip, encode_mp4, encode_png, render  # noqa: E402
from tests.fixtures.s3 import S3Server  # noqa: E402


def upload(server: S3Server, bucket: str, pairs: int, workers: int) -> None:
    client = server.client()
    video = render(ShapeClip("bench", "red", "blue", "right", square=True), 9, 64, 112)
    clip, frame = encode_mp4(video, 8), encode_png(video[0])
    keys = []
    for i in range(pairs):
        stem = f"clip{i:06d}"
        keys += [(f"train/{stem}.mp4", clip), (f"train/{stem}.txt", f"a red square, take {i}".encode()),
                 (f"frames/{stem}.png", frame)]
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
                    {"id": "train", "type": "video", "isI2V": True, "captionStrategy": "textfile", "frames": 9,
                     "resolution": 64, "conditioningData": ["frames"], "source": {"s3": {**source, "prefix": "train/"}}},
                    {"id": "frames", "type": "conditioning", "source": {"s3": {**source, "prefix": "frames/"}}},
                ],
                "aspectBucketAlignment": 16,
                "output": {"s3": {**source, "prefix": "out/"}},
            })
            figures = {"pairs": args.pairs, "objects": objects, "setup_s": round(setup_s, 1)}
            for deep in (False, True):
                name = "deep" if deep else "shallow"
                times = []
                for i in range(args.repeats):
                    t0 = time.monotonic()
                    result = run_preflight(spec, credentials=lambda _name: server.credentials, deep=deep)
                    times.append(time.monotonic() - t0)
                    train = result.report.dataset("train")
                    assert result.report.ok and train.samples == args.pairs, result.report.lines()[:20]
                    print(f"{name} preflight run {i + 1}: {times[-1]:.2f}s, {train.samples} usable samples",
                          flush=True)
                figures |= {f"{name}_s_median": round(statistics.median(times), 2),
                            f"{name}_s_min": round(min(times), 2),
                            f"{name}_pairs_per_s": round(args.pairs / statistics.median(times))}
            print(json.dumps(figures))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
