"""One preview at a time (one GPU): a worker thread takes requests in order; each request's state is what
the preview page polls (queued with its place, running with steps done and ETA, done, failed)."""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from longcat_job.api import ValidationSpec

log = logging.getLogger(__name__)

State = Literal["queued", "running", "done", "failed"]


@dataclass(frozen=True)
class PreviewTask:
    model_source: str
    image: bytes
    image_name: str
    prompt: str
    spec: ValidationSpec
    lora_files: dict[str, bytes] | None = None  # the weights and adapter_config.json of the chosen LoRA
    lora_strength: float = 1.0


@dataclass
class Status:
    state: State = "queued"
    done: int = 0
    total: int = 0
    started: float | None = None
    error: str | None = None
    seconds: float | None = None  # of a finished one

    def eta(self) -> float | None:
        if self.state != "running" or self.started is None or self.done == 0:
            return None
        return (time.monotonic() - self.started) / self.done * (self.total - self.done)


Generate = Callable[[PreviewTask, Callable[[int, int], None]], bytes]
# Finished previews kept (their status and MP4); older ones are forgotten, so a long-running server's memory and
# temp folder stay bounded. A page polling a forgotten one is told so.
KEEP_FINISHED = 50


class PreviewQueue:
    def __init__(self, generate: Generate, folder: Path, keep_finished: int = KEEP_FINISHED) -> None:
        self.generate, self.folder, self.keep_finished = generate, folder, keep_finished
        self.statuses: dict[str, Status] = {}
        self.waiting: list[str] = []
        self.finished: list[str] = []  # oldest first
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, PreviewTask]] = queue.Queue()
        self._ids = itertools.count(1)
        self._worker: threading.Thread | None = None

    def submit(self, task: PreviewTask) -> str:
        with self._lock:
            preview_id = f"p{next(self._ids)}"
            self.statuses[preview_id] = Status()
            self.waiting.append(preview_id)
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name="preview", daemon=True)
                self._worker.start()
        self._queue.put((preview_id, task))
        return preview_id

    def place(self, preview_id: str) -> int | None:
        """1 for the next to run; None once it runs."""
        with self._lock:
            return self.waiting.index(preview_id) + 1 if preview_id in self.waiting else None

    def _work(self) -> None:
        while True:
            preview_id, task = self._queue.get()
            status = self.statuses[preview_id]
            with self._lock:
                self.waiting.remove(preview_id)
                status.state, status.started, status.total = "running", time.monotonic(), task.spec.num_inference_steps

            def on_step(done: int, total: int, status: Status = status) -> None:
                status.done, status.total = done, total

            try:
                video = self.generate(task, on_step)
            except Exception as exc:  # shown on the page; the worker takes the next request
                log.exception("preview %s failed", preview_id)
                self._finish(preview_id, error=f"{type(exc).__name__}: {exc}")
            else:
                self.video(preview_id).write_bytes(video)
                self._finish(preview_id)

    def video(self, preview_id: str) -> Path:
        return self.folder / f"{preview_id}.mp4"

    def _finish(self, preview_id: str, error: str | None = None) -> None:
        """Done or failed, and the oldest finished ones beyond keep_finished forgotten, in one step for pollers."""
        with self._lock:
            status = self.statuses[preview_id]
            status.seconds = time.monotonic() - status.started
            status.error, status.state = error, "done" if error is None else "failed"
            self.finished.append(preview_id)
            while len(self.finished) > self.keep_finished:
                oldest = self.finished.pop(0)
                self.statuses.pop(oldest, None)
                self.video(oldest).unlink(missing_ok=True)
