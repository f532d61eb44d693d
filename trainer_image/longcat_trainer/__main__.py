"""`python -m longcat_trainer --config job.json`: one trainer process (torchrun starts one per GPU).

job.json is the LongCatI2VJob document (the operator's ConfigMap, or the file `longcat-i2v run` writes).
Exit codes are those of `longcat_job.failures` (0 done, 1 an error worth a restart, 78 bad input or configuration,
143 stopped with a checkpoint). The reason is also in progress.json and, in a pod, in the container's termination
message. torchrun itself exits 1 when a worker fails, so the code is also written to $LONGCAT_EXIT_CODE_FILE.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from longcat_job import s3
from longcat_job.failures import EXIT_CODE_FILE_ENV, ExitCode, FailureReason, Outcome, classify, termination_message
from longcat_job.parse import InvalidJob, parse_job

# Kubernetes mounts this file and shows its text as the container's termination message.
TERMINATION_LOG = Path(os.environ.get("LONGCAT_TERMINATION_LOG", "/dev/termination-log"))


def _terminate(outcome: Outcome) -> int:
    # An error worth a restart gets its traceback in the log; bad input and configuration only their message.
    logging.getLogger("longcat_trainer").error("%s", outcome.message, exc_info=outcome.reason is FailureReason.ERROR)
    if TERMINATION_LOG.is_file():  # only in a pod: never create files under /dev elsewhere
        TERMINATION_LOG.write_text(termination_message(outcome))
    if exit_file := os.environ.get(EXIT_CODE_FILE_ENV):
        Path(exit_file).write_text(str(int(outcome.exit_code)))
    return outcome.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longcat_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the LongCatI2VJob as JSON")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")

    try:
        job = parse_job(json.loads(args.config.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        return _terminate(Outcome(ExitCode.CONFIG, FailureReason.INVALID_CONFIG,
                                  f"--config {args.config}: cannot read the job ({exc})"))
    except InvalidJob as exc:
        return _terminate(Outcome(ExitCode.CONFIG, FailureReason.INVALID_CONFIG,
                                  f"--config {args.config}: invalid job:\n{exc}"))

    from . import (  # torch is imported only once the job file is known to be good
        train,
        validation_videos,
    )

    try:
        # One Validator for the whole run: it keeps the encoded start frames and captions between steps.
        train.run(job, train.Hooks(validate=validation_videos.Validator()))
    except Exception as exc:
        # The operator shows the message when it gives up on the gang (S3 being down included, when
        # progress.json cannot say it).
        return _terminate(classify(exc))
    return ExitCode.OK


if __name__ == "__main__":
    # A trainer that gives up costs a gang restart: its S3 requests ride out outages the operator's would not.
    # Set here, not in main(), so that tests calling main() in-process keep their own budget afterwards.
    s3.use_budget(s3.TRAINER)
    sys.exit(main())
