"""The operator's Prometheus metrics, served on its own /metrics port."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from longcat_job.api import Phase

RECONCILE_SECONDS = Histogram(
    "longcat_operator_reconcile_seconds", "Time spent in one handler run.", ["handler"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
PREFLIGHT_SECONDS = Histogram(
    "longcat_operator_preflight_seconds", "Time to list and pair every dataset of a job.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 20, 60, 120, 300),
)
PREFLIGHT_FAILURES = Counter(
    "longcat_operator_preflight_failures_total", "Jobs refused before launch, by reason.", ["reason"]
)
GANG_RESTARTS = Counter(
    "longcat_operator_gang_restarts_total", "Gangs deleted and created again after a pod failed.",
    ["namespace", "job"],
)
QUEUE_LATENCY = Histogram(
    "longcat_operator_queue_latency_seconds", "From the job's creation to its first Job object.",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)


class PhaseCollector(Collector):
    """`longcat_operator_jobs{phase}`: how many jobs this operator sees in each phase, computed at scrape."""

    def __init__(self) -> None:
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def observe(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            self._phases[(namespace, name)] = phase or Phase.PENDING.value

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phases.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            counts = Tally(self._phases.values())
        family = GaugeMetricFamily("longcat_operator_jobs", "LongCatI2VJobs by phase.", labels=["phase"])
        for phase in Phase:
            family.add_metric([phase.value], counts.get(phase.value, 0))
        yield family


JOBS_BY_PHASE = PhaseCollector()
REGISTRY.register(JOBS_BY_PHASE)
