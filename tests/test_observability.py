"""Prometheus scrapes the operator and a trainer, and every panel of the chart's Grafana dashboard finds data.

The operator runs in-process against the real control plane and S3 server and goes through a launch, a gang
restart and a preflight failure; a tiny trainer runs two real steps on the CPU. A real Prometheus (Debian's
package) scrapes both; each panel's PromQL, with Grafana's variables filled in, must return a series.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from longcat_job.parse import parse_job
from longcat_job.storage import LocalStore
from tests.fixtures.cluster import Cluster, free_port
from tests.fixtures.operator import (
    STEMS,
    apply_job,
    attempt_pods,
    credentials_and_data,
    phase_is,
    put_dataset,
    running_operator,
    s3_job,
    set_pod_phase,
    wait_for,
)
from tests.fixtures.prometheus import Prometheus
from tests.fixtures.training import job_document, location

pytestmark = [pytest.mark.cluster, pytest.mark.s3, pytest.mark.slow]

DASHBOARD = Path(__file__).resolve().parents[1] / "charts" / "longcat-operator" / "dashboards" / "longcat-training.json"
# Grafana fills these in; the values are what a user looking at the last minutes would get.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "10m", "$job": ".*"}


def panel_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] if panel["type"] != "row"
            for target in panel["targets"]]


def with_variables(expr: str) -> str:
    return re.sub(r"\$__rate_interval|\$__range|\$job", lambda m: GRAFANA_VARIABLES[m.group(0)], expr)


def run_tiny_trainer(tiny_checkpoint: Path, root: Path) -> None:
    """Two optimizer steps of the real trainer on the CPU, a checkpoint after each, and the final validation."""
    from longcat_trainer import train, validation_videos
    from longcat_trainer.data.synthetic import write_shapes_dataset

    write_shapes_dataset(LocalStore(root / "shapes"), count=2, frames=9, height=64, width=112)
    document = job_document(tiny_checkpoint, location(root / "shapes" / "clips"),
                            location(root / "shapes" / "start_frames"), location(root / "out"),
                            training={"maxSteps": 2, "checkpointEvery": 1})
    train.run(parse_job(document), train.Hooks(validate=validation_videos.Validator()))


def drive_operator(cluster: Cluster, namespace: str, s3_server: Any, s3_bucket: str) -> None:
    """A job launched then restarted once, and one refused by preflight (no start frames)."""
    credentials_and_data(cluster, namespace, s3_server, s3_bucket)
    apply_job(cluster, namespace, s3_job("watched", s3_server, s3_bucket, nodes=1))
    wait_for("phase Launching", phase_is(cluster, namespace, "watched", "Launching"))
    pod = wait_for("the gang's pod", lambda: attempt_pods(cluster, namespace, "watched", 0))[0]
    set_pod_phase(cluster, namespace, pod["metadata"]["name"], "Failed", exit_code=137)
    wait_for("a gang restart", lambda: attempt_pods(cluster, namespace, "watched", 1))

    frames_bucket = s3_server.create_bucket()
    put_dataset(s3_server, frames_bucket, STEMS, start_frames=STEMS[:1])
    apply_job(cluster, namespace, s3_job("noframes", s3_server, frames_bucket, nodes=1))
    wait_for("phase Failed", phase_is(cluster, namespace, "noframes", "Failed"))


def test_every_dashboard_panel_finds_series(
    crd_installed: Cluster, namespace: str, s3_server, s3_bucket: str, tiny_checkpoint: Path, tmp_path: Path,
    prometheus, monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer_port = free_port()
    monkeypatch.setenv("LONGCAT_METRICS_PORT", str(trainer_port))
    run_tiny_trainer(tiny_checkpoint, tmp_path)
    # The operator's handlers record into the default registry, which its entry point serves the same way.
    operator_server, _ = prometheus_client.start_http_server(free_port(), addr="127.0.0.1")
    try:
        operator_port = operator_server.server_address[1]
        server: Prometheus = prometheus({"longcat-operator": [f"127.0.0.1:{operator_port}"],
                                         "longcat-trainers": [f"127.0.0.1:{trainer_port}"]})
        wait_for("both targets up", lambda: server.targets_up() == {"longcat-operator": True,
                                                                     "longcat-trainers": True}, timeout=30)
        with running_operator(crd_installed, namespace) as runner:
            drive_operator(crd_installed, namespace, s3_server, s3_bucket)
            # Prometheus scrapes every second: give it the operator's last numbers before checking.
            wait_for("the restart in Prometheus", lambda: server.query(
                f'longcat_operator_gang_restarts_total{{namespace="{namespace}", job="watched"}}'), timeout=30)
            empty = []
            for title, expr in panel_queries():
                if not wait_for_series(server, with_variables(expr)):
                    empty.append(f"{title}: {expr}")
        assert runner.exception is None, runner.exception
        assert not empty, "dashboard panels whose query finds no series:\n" + "\n".join(empty)

        # The numbers are the ones the two runs made, not just any series.
        loss = server.query('longcat_trainer_loss{job="tiny"}')
        assert float(loss[0]["value"][1]) > 0
        assert server.query('longcat_trainer_step{job="tiny"}')[0]["value"][1] == "2"
        checkpoints = server.query('longcat_trainer_checkpoint_seconds_count{job="tiny"}')
        assert checkpoints[0]["value"][1] == "2"
        assert server.query('longcat_trainer_validation_seconds_count{job="tiny"}')[0]["value"][1] == "1"
        failures = server.query("longcat_operator_preflight_failures_total")
        assert "ClipWithoutStartFrame" in {s["metric"]["reason"] for s in failures}, failures
        phases = {s["metric"]["phase"]: float(s["value"][1]) for s in server.query("longcat_operator_jobs")}
        assert phases["Failed"] >= 1 and phases["Launching"] >= 1, phases
    finally:
        operator_server.shutdown()


def wait_for_series(server: Prometheus, expr: str, timeout: float = 15) -> list[dict[str, Any]]:
    """The query's series, waiting a few scrapes for counters that rate() needs two samples of."""
    try:
        return wait_for(expr, lambda: server.query(expr), timeout=timeout, interval=1)
    except AssertionError:
        return []
