"""How a trainer pod reports itself: Prometheus `/metrics` and log lines with rate and ETA.

Every metric is named `longcat_trainer_*` and carries the job's name as label `job`; each pod serves its
own endpoint (local rank 0), so one pod's numbers are those of its first process.
"""

from __future__ import annotations

import logging
import time

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

log = logging.getLogger(__name__)

METRICS_PORT_ENV = "LONGCAT_METRICS_PORT"
DEFAULT_METRICS_PORT = 9400
LOG_EVERY_S = 10.0


class TrainerMetrics:
    def __init__(self, job: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["job"]

        def gauge(name: str, text: str) -> Gauge:
            return Gauge(f"longcat_trainer_{name}", text, labels, registry=self.registry).labels(job)

        self.step = gauge("step", "Optimizer steps done.")
        self.max_steps = gauge("max_steps", "Optimizer steps the job runs.")
        self.loss = gauge("loss", "Flow-matching loss of the last step (mean over ranks).")
        self.lr = gauge("learning_rate", "Learning rate of the last step.")
        self.samples_per_second = gauge("samples_per_second", "Training samples per second, all ranks.")
        self.latent_tokens_per_second = gauge("latent_tokens_per_second", "DiT tokens per second, all ranks.")
        self.gpu_memory = gauge("gpu_memory_bytes", "Peak GPU memory allocated by this process.")
        self.data_wait = Counter(
            "longcat_trainer_data_wait_seconds", "Time the loop waited for data.", labels, registry=self.registry
        ).labels(job)
        def histogram(name: str, text: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"longcat_trainer_{name}", text, labels, registry=self.registry,
                             buckets=buckets).labels(job)

        self.checkpoint_seconds = histogram("checkpoint_seconds", "Time to write one checkpoint.",
                                            (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300))
        self.validation_seconds = histogram(
            "validation_seconds",
            "Time of one validation pass (every sample's video, contact sheet and report); training waits for it.",
            (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
        )
        cache = Counter(
            "longcat_trainer_cache_entries", "Cache entries by result.", ["job", "result"], registry=self.registry
        )
        self.cache_hits, self.cache_misses = cache.labels(job, "hit"), cache.labels(job, "miss")
        self.bad_samples = gauge("bad_samples", "Samples skipped as unusable.")

    def serve(self, port: int) -> None:
        if port:
            start_http_server(port, addr="0.0.0.0", registry=self.registry)
            log.info("metrics on :%d/metrics", port)

    def observe_gpu(self, device: torch.device) -> None:
        if device.type == "cuda":
            self.gpu_memory.set(torch.cuda.max_memory_allocated(device))


class RateLog:
    """Logs 'what: done/total (rate/s, ETA)' at most every LOG_EVERY_S seconds, and always at the end.

    `done_before` is where a resumed run starts, so that its rate counts only this run's work.
    """

    def __init__(self, what: str, total: int, unit: str = "", done_before: int = 0) -> None:
        self.what, self.total, self.unit, self.done_before = what, total, unit, done_before
        self.start = self.last = time.monotonic()

    def rate(self, done: int) -> float:
        return (done - self.done_before) / max(time.monotonic() - self.start, 1e-9)

    def eta(self, done: int) -> float:
        rate = self.rate(done)
        return (self.total - done) / rate if rate > 0 else float("inf")

    def update(self, done: int, extra: str = "") -> None:
        now = time.monotonic()
        if now - self.last < LOG_EVERY_S and done < self.total:
            return
        self.last = now
        log.info("%s: %d/%d (%.2f%s/s, ETA %.0fs)%s", self.what, done, self.total, self.rate(done), self.unit,
                 self.eta(done), extra)
