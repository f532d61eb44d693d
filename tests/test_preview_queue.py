"""The preview queue on its own: requests run one at a time in order, and a long-running server keeps only the
last finished previews (statuses and MP4s), so its memory and temp folder stay bounded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from longcat_job.api import ValidationSpec
from longcat_ui.preview_queue import PreviewQueue, PreviewTask


def task(prompt: str) -> PreviewTask:
    return PreviewTask("local-model", b"png", "start.png", prompt, ValidationSpec(num_inference_steps=2))


def wait_until(condition: Callable[[], bool], seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_requests_run_in_order_and_only_the_last_finished_are_kept(tmp_path: Path) -> None:
    release = threading.Event()
    ran: list[str] = []

    def generate(t: PreviewTask, on_step) -> bytes:
        release.wait(10)  # the first request holds the worker while the others queue
        on_step(2, 2)
        ran.append(t.prompt)
        if t.prompt == "bad":
            raise ValueError("the sampler refused it")
        return t.prompt.encode()

    queue = PreviewQueue(generate, tmp_path, keep_finished=2)
    ids = [queue.submit(task(p)) for p in ("a", "bad", "c", "d")]
    assert wait_until(lambda: queue.statuses[ids[0]].state == "running")
    assert [queue.place(i) for i in ids] == [None, 1, 2, 3]
    release.set()
    assert wait_until(lambda: queue.statuses[ids[3]].state == "done") and ran == ["a", "bad", "c", "d"]
    # Only the last two finished previews are kept: "a" and the failed "bad" are forgotten, files included.
    assert sorted(queue.statuses) == sorted(ids[2:])
    assert [queue.statuses[i].state for i in ids[2:]] == ["done", "done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{i}.mp4" for i in ids[2:])
    assert queue.video(ids[3]).read_bytes() == b"d"
