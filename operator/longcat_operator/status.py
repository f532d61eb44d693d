"""Conditions and phases of a job's status: the one place every transition is written.

Conditions have the metav1.Condition shape; `lastTransitionTime` moves only when a condition's status does.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from .api import Phase

TERMINAL = {Phase.SUCCEEDED.value, Phase.FAILED.value}

# Condition types, in the order a job meets them.
VALIDATED = "Validated"
DATASET_READY = "DatasetReady"
LAUNCHED = "Launched"
RUNNING = "Running"
COMPLETE = "Complete"
FAILED = "Failed"

# Longest message kept in a condition; preflight reports can list many problems.
MAX_MESSAGE = 4000


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def with_condition(
    conditions: list[dict[str, Any]] | None,
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """The list with `type_` set; the other conditions are kept as they are."""
    conditions = [dict(c) for c in conditions or []]
    old = next((c for c in conditions if c["type"] == type_), None)
    changed = old is None or old.get("status") != status
    new = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message[:MAX_MESSAGE],
        "observedGeneration": generation,
        "lastTransitionTime": now() if changed else old["lastTransitionTime"],
    }
    if old is None:
        conditions.append(new)
    else:
        conditions[conditions.index(old)] = new
    return conditions


def condition(conditions: list[dict[str, Any]] | None, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions or [] if c["type"] == type_), None)
