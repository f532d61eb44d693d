"""What rank 0 leaves under the output location for people and the operator: progress.json, loss.json and
loss.png."""

from __future__ import annotations

import io
import logging
import math
import time
from datetime import UTC, datetime

from longcat_job import output_layout
from longcat_job.loss_history import DEFAULT_SMOOTHING, LossHistory, smoothed
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


def loss_curve_png(history: LossHistory) -> bytes:
    """Loss against step (raw and smoothed) with the learning rate on a second axis, ticks on both."""
    import matplotlib  # noqa: PLC0415 - loaded only when a curve is drawn (the first checkpoint)

    matplotlib.use("Agg")  # no display in a pod
    from matplotlib import pyplot  # noqa: PLC0415

    figure, axis = pyplot.subplots(figsize=(8, 4.5), dpi=100)
    try:
        axis.plot(history.step, [math.nan if v is None else v for v in history.loss], color="#9db3e6",
                  linewidth=1, label="loss")
        axis.plot(history.step, [math.nan if v is None else v for v in smoothed(history.loss)], color="#1f3a9e",
                  linewidth=2, label=f"loss, smoothed ({DEFAULT_SMOOTHING} EMA)")
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.grid(alpha=0.3)
        lr_axis = axis.twinx()
        lr_axis.plot(history.step, [math.nan if v is None else v for v in history.lr], color="#d9822b",
                     linewidth=1.5, label="learning rate")
        lr_axis.set_ylabel("learning rate", color="#d9822b")
        lr_axis.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        lines = axis.get_lines() + lr_axis.get_lines()
        axis.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize="small")
        axis.set_title("training loss")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
    finally:
        pyplot.close(figure)
    return buffer.getvalue()


def write_loss(store: ObjectStore, history: LossHistory) -> None:
    """loss.json and loss.png, from the same rows."""
    store.put_bytes(output_layout.LOSS_HISTORY, history.to_json(), content_type="application/json")
    store.put_bytes(output_layout.LOSS_CURVE, loss_curve_png(history), content_type="image/png")
