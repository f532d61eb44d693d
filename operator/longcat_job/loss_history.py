"""`loss.json`: the loss and learning rate of every training step, as the trainer writes it beside loss.png
and the UI server charts it (torch-free: one model for both sides)."""

from __future__ import annotations

import math
from collections.abc import Iterable

from pydantic import BaseModel, Field

# The smoothing of the static plot, and the UI chart's starting value (a slider there changes it).
DEFAULT_SMOOTHING = 0.9


class LossHistory(BaseModel):
    """Columns of equal length; a loss that was not finite is null (JSON has no NaN)."""

    step: list[int] = Field(default_factory=list)
    loss: list[float | None] = Field(default_factory=list)
    lr: list[float | None] = Field(default_factory=list)

    @classmethod
    def of(cls, rows: Iterable[tuple[int, float, float | None]]) -> LossHistory:
        history = cls()
        for step, loss, lr in rows:
            history.step.append(step)
            history.loss.append(loss if math.isfinite(loss) else None)
            history.lr.append(lr)
        return history

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


def smoothed(values: list[float | None], weight: float = DEFAULT_SMOOTHING) -> list[float | None]:
    """Exponential moving average, debiased so the first points are not pulled towards zero (TensorBoard's);
    missing values stay missing and do not move the average."""
    out: list[float | None] = []
    average, total = 0.0, 0.0
    for value in values:
        if value is None:
            out.append(None)
            continue
        average = weight * average + (1 - weight) * value
        total = weight * total + (1 - weight)
        out.append(average / total)
    return out
