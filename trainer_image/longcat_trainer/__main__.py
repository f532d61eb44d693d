"""`python -m longcat_trainer --config job.json`: one trainer process (torchrun starts one per GPU).

job.json is the LongCatI2VJob document (the operator's ConfigMap, or the file `longcat-i2v run` writes).
Exit codes: 0 done; 78 (EXIT_CONFIG_ERROR) the job file, model or data is wrong and a restart cannot help;
143 (EXIT_PREEMPTED) stopped by SIGTERM or Ctrl-C after saving a checkpoint; anything else: an error worth a restart.
The reason is also in progress.json and, in a pod, in the container's termination message. torchrun
itself exits 1 when a worker fails, so the code is also written to $LONGCAT_EXIT_CODE_FILE when set.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from longcat_operator import s3
from longcat_operator.progress import EXIT_CONFIG_ERROR, EXIT_PREEMPTED
from longcat_operator.validation import InvalidJob, parse_job

# Kubernetes mounts this file and shows its text as the container's termination message.
TERMINATION_LOG = Path(os.environ.get("LONGCAT_TERMINATION_LOG", "/dev/termination-log"))
# torchrun exits 1 whatever its workers' codes: a launcher that needs ours reads it from this file.
EXIT_CODE_FILE_ENV = "LONGCAT_EXIT_CODE_FILE"
# Any other failure: the code of an uncaught exception, which the operator answers with a gang restart.
EXIT_ERROR = 1


def _terminate(code: int, message: str, *, exc_info: bool = False) -> int:
    logging.getLogger("longcat_trainer").error("%s", message, exc_info=exc_info)
    if TERMINATION_LOG.is_file():  # only in a pod: never create files under /dev elsewhere
        TERMINATION_LOG.write_text(message[:4000])  # Kubernetes keeps at most 4 KiB
    if exit_file := os.environ.get(EXIT_CODE_FILE_ENV):
        Path(exit_file).write_text(str(code))
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longcat_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True, help="the LongCatI2VJob as JSON")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")

    try:
        job = parse_job(json.loads(args.config.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError) as exc:
        return _terminate(EXIT_CONFIG_ERROR, f"--config {args.config}: cannot read the job ({exc})")
    except InvalidJob as exc:
        return _terminate(EXIT_CONFIG_ERROR, f"--config {args.config}: invalid job:\n{exc}")

    from . import train, validate  # torch is imported only once the job file is known to be good

    try:
        # One Validator for the whole run: it keeps the encoded start frames and captions between steps.
        train.run(job, train.Hooks(validate=validate.Validator()))
    except train.Preempted as exc:
        return _terminate(EXIT_PREEMPTED, str(exc))
    except train.CONFIG_ERRORS as exc:
        return _terminate(EXIT_CONFIG_ERROR, f"{type(exc).__name__}: {exc}")
    except Exception as exc:
        # Worth a restart; the operator shows this message when it gives up on the gang (S3 being down
        # included, when progress.json cannot say it).
        return _terminate(EXIT_ERROR, f"{type(exc).__name__}: {exc}", exc_info=True)
    return 0


if __name__ == "__main__":
    # A trainer that gives up costs a gang restart: its S3 requests ride out outages the operator's would not.
    # Set here, not in main(), so that tests calling main() in-process keep their own budget afterwards.
    s3.use_budget(s3.TRAINER)
    sys.exit(main())
