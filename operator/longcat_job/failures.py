"""Why a job stopped: one taxonomy for the trainer, the operator and `longcat-i2v run`.

    exit code  reason         meaning                                                   the operator
    0          -              training finished                                         Succeeded
    1          Error          anything else: S3 outage, out of memory, a bug, a node   restarts the gang from
                              lost (and whatever torchrun reports for a failed worker)  the last checkpoint
    78         BadInput       the data cannot be trained on; the message names files    fails the job at once
    78         InvalidConfig  the job file, the model checkpoint or its source is wrong fails the job at once
    78         AccessDenied   S3 refused the credentials, or they may not do this       fails the job at once
    78         NoSuchBucket   a bucket the job names does not exist                     fails the job at once
    130        -              `longcat-i2v run` stopped by Ctrl-C before training began -
    143        -              stopped by SIGTERM or Ctrl-C after saving a checkpoint    (a restart resumes)

Only errors that the code raises on purpose for bad input or configuration (subclasses of `BadInputError` and
`InvalidConfigError`), and storage errors whose cause a retry cannot change (`StorageError` with a permanent
reason), are permanent: a ValueError out of torch, pydantic or a tensor shape is a bug or a transient state, as
are timeouts, 5xx answers and throttling, and a restart is the right answer to them.

The reason travels with the message: the trainer writes `<reason>: <message>` to its container's termination
message (`termination_message`), which the operator reads from the pod status (`parse_termination_message`)
when progress.json could not be written (the output bucket is the one refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import ClassVar

# torchrun exits 1 whatever its workers' codes: a launcher that needs the trainer's reads it from this file.
EXIT_CODE_FILE_ENV = "LONGCAT_EXIT_CODE_FILE"


class FailureReason(StrEnum):
    BAD_INPUT = "BadInput"
    INVALID_CONFIG = "InvalidConfig"
    ACCESS_DENIED = "AccessDenied"
    NO_SUCH_BUCKET = "NoSuchBucket"
    ERROR = "Error"

    @property
    def permanent(self) -> bool:
        """True when no restart can help: the job fails at once instead of spending its restarts."""
        return self is not FailureReason.ERROR


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    CONFIG = 78  # sysexits.h EX_CONFIG
    INTERRUPTED = 130  # 128 + SIGINT
    PREEMPTED = 143  # 128 + SIGTERM


class JobError(Exception):
    """An error raised on purpose because of the job's input; its class says whether a restart can help."""

    reason: ClassVar[FailureReason]


class BadInputError(JobError, ValueError):
    """The job's data cannot be trained on; the message names the files and what to do."""

    reason = FailureReason.BAD_INPUT


class InvalidConfigError(JobError, ValueError):
    """The job file, the model checkpoint or its source is wrong; the message names the field or the file."""

    reason = FailureReason.INVALID_CONFIG


class StorageError(Exception):
    """Storage could not be used; `reason` says whether a retry can help (ERROR: an outage, a timeout)."""

    def __init__(self, message: str, reason: FailureReason = FailureReason.ERROR) -> None:
        super().__init__(message)
        self.reason = reason


class Preempted(Exception):
    """SIGTERM (or Ctrl-C) arrived and a checkpoint was saved: not a failure, a restart resumes."""


@dataclass(frozen=True)
class Outcome:
    """How a trainer process ends for an exception: its exit code and, for a failure, the reason."""

    exit_code: ExitCode
    reason: FailureReason | None
    message: str


def classify(exc: BaseException) -> Outcome:
    if isinstance(exc, Preempted):
        return Outcome(ExitCode.PREEMPTED, None, str(exc))
    if isinstance(exc, JobError | StorageError) and exc.reason.permanent:
        return Outcome(ExitCode.CONFIG, exc.reason, str(exc))
    return Outcome(ExitCode.ERROR, FailureReason.ERROR, f"{type(exc).__name__}: {exc}")


def reason_of_exit(code: int) -> FailureReason | None:
    """The reason a trainer exit code stands for (None: success or a stop with a checkpoint).

    78 cannot tell bad data from bad configuration; the trainer's progress.json and termination message say which.
    """
    if code in (ExitCode.OK, ExitCode.PREEMPTED, ExitCode.INTERRUPTED):
        return None
    return FailureReason.BAD_INPUT if code == ExitCode.CONFIG else FailureReason.ERROR


# Kubernetes keeps at most 4 KiB of a termination message.
TERMINATION_MESSAGE_LIMIT = 4096


def termination_message(outcome: Outcome) -> str:
    """What the trainer leaves as its container's termination message: `<reason>: <message>`."""
    reason = outcome.reason or FailureReason.ERROR
    return f"{reason.value}: {outcome.message}"[:TERMINATION_MESSAGE_LIMIT]


def parse_termination_message(text: str) -> tuple[FailureReason | None, str]:
    """(reason, message) of a termination message; reason None when it is not one the trainer wrote."""
    head, sep, rest = text.partition(": ")
    if sep and head in FailureReason.__members__.values():
        return FailureReason(head), rest
    return None, text
