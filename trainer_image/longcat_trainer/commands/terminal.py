"""How `longcat-i2v run` shows a training run: a progress bar on a terminal, periodic lines elsewhere (CI logs).

Both read the trainer's progress.json (step, loss, rate and ETA as the trainer measures them). Before training
starts (model download, caching) the last line of the trainer's log stands in for the step count.
"""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from longcat_job.progress import TrainerProgress

LINE_EVERY_S = 10.0
LOG_TAIL_BYTES = 4096
STATUS_WIDTH = 90
# The trainer's log format (longcat_trainer.__main__): "2026-01-01 12:00:00,000 rank0 INFO name: message".
_LOG_PREFIX = re.compile(r"^\S+ \S+ rank\d+ [A-Z]+ [\w.]+: ")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def last_log_line(log_file: Path) -> str:
    """The trainer's latest message, without the timestamp and logger name (cut to STATUS_WIDTH)."""
    try:
        with log_file.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - LOG_TAIL_BYTES))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    words = [line.strip() for line in lines if any(c.isalpha() for c in line)]  # not torchrun's "*****" rules
    return _LOG_PREFIX.sub("", words[-1])[:STATUS_WIDTH] if words else ""


def status_text(doc: TrainerProgress | None, log_file: Path) -> str:
    """'loss 0.1234, 1.50 samples/s, ETA 2m05s' while training; the trainer's last log line before."""
    if doc is None or doc.phase != "Training" or doc.progress.loss is None:
        return last_log_line(log_file)
    p = doc.progress
    parts = [f"loss {p.loss:.4f}"]
    if p.samples_per_second is not None:
        parts.append(f"{p.samples_per_second:.2f} samples/s")
    if p.eta_seconds is not None and p.eta_seconds != float("inf"):
        parts.append(f"ETA {duration(p.eta_seconds)}")
    return ", ".join(parts)


class ProgressView:
    """A tqdm bar when stderr is a terminal; else a line at each phase change and every LINE_EVERY_S."""

    def __init__(self, max_steps: int, log_file: Path, say: Any = print) -> None:
        self.max_steps, self.log_file, self._say = max_steps, log_file, say
        self.bar: Any = None
        self._last_line, self._last_text, self._last_phase, self._last_step = 0.0, "", "", -1

    def __enter__(self) -> ProgressView:
        if sys.stderr.isatty():
            from tqdm import tqdm  # noqa: PLC0415 - installed with the trainer, which `run` needs anyway

            self.bar = tqdm(total=self.max_steps, unit="step", dynamic_ncols=True, desc="Starting",
                            bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}{postfix}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def say(self, *args: object, file: Any = None) -> None:
        """Print without breaking the bar."""
        if self.bar is not None:
            self.bar.write(" ".join(str(a) for a in args), file=file or sys.stdout)
        else:
            self._say(*args, file=file or sys.stdout)

    def update(self, doc: TrainerProgress | None) -> None:
        phase = doc.phase if doc is not None else "Starting"
        step = doc.progress.step if doc is not None else 0
        text = status_text(doc, self.log_file)
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_description_str(phase, refresh=False)
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.refresh()
            return
        line = f"{phase} step {step}/{self.max_steps}" + (f": {text}" if text else "")
        now = time.monotonic()
        new_phase, new_step = phase != self._last_phase, step != self._last_step
        if new_phase or (line != self._last_text and (now - self._last_line >= LINE_EVERY_S
                                                        or new_step and step == self.max_steps)):
            self._say(line, file=sys.stdout)
            self._last_line, self._last_text, self._last_phase, self._last_step = now, line, phase, step


def local_path(uri: str) -> str:
    """file:///a/b -> /a/b (what a user types or clicks); other URIs unchanged."""
    return url2pathname(urlparse(uri).path) if uri.startswith("file://") else uri


def final_videos(doc: TrainerProgress) -> list[str]:
    """The MP4s of the last validation (the videos of every step are listed in index.html)."""
    step = f"/validation/step-{doc.progress.step}/"
    return [v for v in doc.artifacts.validation_videos if step in v] or doc.artifacts.validation_videos


def print_summary(doc: TrainerProgress, output_url: str, say: Any = print) -> None:
    base = output_url.rstrip("/")
    loss = f", last loss {doc.progress.loss:.4f}" if doc.progress.loss is not None else ""
    say(f"done: {doc.progress.step} steps{loss}")
    rows = [("LoRA", doc.artifacts.lora)]
    for video in final_videos(doc):
        rows += [("video", video), ("contact sheet", video.removesuffix(".mp4") + ".png")]
    rows += [("report", doc.artifacts.report), ("loss curve", f"{base}/loss.png"),
             ("checkpoint", doc.artifacts.latest_checkpoint)]
    for what, uri in rows:
        if uri:
            say(f"  {what + ':':<15}{local_path(uri)}")
