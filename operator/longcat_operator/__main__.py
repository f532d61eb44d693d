"""`python -m longcat_operator [kopf run options]`: the operator as its image runs it.

Serves the operator's Prometheus metrics, then runs kopf with the handlers of `longcat_operator.reconcile`
and the options given (`--peering=NAME`, `--all-namespaces` or `--namespace=NS`, `--liveness=URL`, ...).

Replicas share one kopf peering object for leader election. kopf freezes every replica when two have the
same priority, so each replica that names no `--priority` draws a random one: the highest runs, the others
stand by and take over when its peering entry expires.
"""

from __future__ import annotations

import os
import random
import sys

import kopf.cli
import prometheus_client

METRICS_PORT_ENV = "LONGCAT_OPERATOR_METRICS_PORT"
DEFAULT_METRICS_PORT = 8000
HANDLERS = "longcat_operator.reconcile"
# kopf compares priorities as integers; a range this wide makes a tie between replicas vanishingly unlikely.
MAX_PRIORITY = 2**31 - 1


def kopf_args(options: list[str]) -> list[str]:
    """The `kopf run` command line: our handlers, the caller's options, and a priority for peering replicas."""
    args = ["run", "-m", HANDLERS, *options]
    peering = any(o.startswith("--peering") for o in options) and "--standalone" not in options
    if peering and not any(o.startswith("--priority") for o in options):
        priority = random.SystemRandom().randint(1, MAX_PRIORITY)
        # kopf logs peers by identity only; this line tells which replica is which in the peering object.
        print(f"longcat-operator: peering with priority {priority}", file=sys.stderr, flush=True)
        args.append(f"--priority={priority}")
    return args


def main(argv: list[str] | None = None) -> None:
    port = int(os.environ.get(METRICS_PORT_ENV, DEFAULT_METRICS_PORT))
    if port:
        # The handlers' metrics live in the default registry, which this serves with process metrics.
        prometheus_client.start_http_server(port, addr="0.0.0.0")
    kopf.cli.main(args=kopf_args(sys.argv[1:] if argv is None else argv), prog_name="python -m longcat_operator")


if __name__ == "__main__":
    main()
