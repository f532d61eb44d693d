"""What rank 0 leaves under the output location for people and the operator: progress.json and loss.png."""

from __future__ import annotations

import io
import logging
import math
import time
from datetime import UTC, datetime

from PIL import Image, ImageDraw

from longcat_job.progress import (
    PROGRESS_KEY,
    Failure,
    FailureReason,
    Phase,
    TrainerProgress,
)
from longcat_job.s3 import S3AccessError
from longcat_job.storage import ObjectStore

log = logging.getLogger(__name__)

LOSS_CURVE = "loss.png"
# The page that shows every validation step's videos beside the loss curve (written by validate.py).
INDEX_HTML = "index.html"
WRITE_EVERY_S = 10.0


def uri(store: ObjectStore, key: str) -> str:
    return f"{store.url.rstrip('/')}/{key}"


class Reporter:
    """Holds the progress document; `write` uploads it (rank 0 only), at most every WRITE_EVERY_S unless forced."""

    def __init__(self, store: ObjectStore, *, enabled: bool, world_size: int) -> None:
        self.store, self.enabled = store, enabled
        self.doc = TrainerProgress(world_size=world_size, updated=datetime.now(UTC))
        self._last = 0.0

    def phase(self, phase: Phase) -> None:
        self.doc.phase = phase
        self.write(force=True)

    def fail(self, reason: FailureReason, message: str) -> None:
        """Records the failure in progress.json if the output can still be written; when it cannot (S3 is
        down), the caller's exception must still propagate: the termination message then carries it."""
        self.doc.failure = Failure(reason=reason, message=message)
        try:
            self.phase("Failed")
        except (S3AccessError, OSError) as exc:
            log.warning("the failure is not in progress.json: %s", exc)

    def write(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < WRITE_EVERY_S):
            return
        self._last = now
        self.doc.updated = datetime.now(UTC)
        self.store.put_bytes(PROGRESS_KEY, self.doc.to_json())


def loss_curve_png(history: list[tuple[int, float]], width: int = 640, height: int = 360) -> bytes:
    """A plain line plot of loss against step (with a 10-step moving average when there are enough points)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 30, height - 40
    draw.rectangle([left, top, right, bottom], outline="black")
    draw.text((left, 8), "training loss", fill="black")
    points = [(s, v) for s, v in history if math.isfinite(v)]
    if points:
        steps = [s for s, _ in points]
        values = [v for _, v in points]
        s0, s1 = min(steps), max(max(steps), min(steps) + 1)
        v0, v1 = min(values), max(values)
        v1 = v1 if v1 > v0 else v0 + 1e-6

        def xy(step: float, value: float) -> tuple[float, float]:
            return (left + (step - s0) / (s1 - s0) * (right - left), bottom - (value - v0) / (v1 - v0) * (bottom - top))

        draw.line([xy(s, v) for s, v in points], fill=(150, 170, 220), width=1)
        window = 10
        if len(points) >= 2 * window:
            smooth = [(steps[i], sum(values[i - window + 1 : i + 1]) / window) for i in range(window - 1, len(points))]
            draw.line([xy(s, v) for s, v in smooth], fill=(20, 40, 160), width=2)
        draw.text((4, top), f"{v1:.4g}", fill="black")
        draw.text((4, bottom - 10), f"{v0:.4g}", fill="black")
        draw.text((left, bottom + 8), f"step {s0}", fill="black")
        draw.text((right - 70, bottom + 8), f"step {s1}", fill="black")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
