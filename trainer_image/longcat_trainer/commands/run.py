"""`longcat-i2v run JOB.yaml`: the job of a cluster, run on this machine by the code its pods run.

    validate -> resolve local paths -> preflight + manifest.json (as the operator) -> torchrun with N processes
    -> a progress view over <output>/progress.json -> where the LoRA, the videos and the report are

Relative local paths in the job file (dataset and cache directories, the output, a model directory) mean
paths relative to the job file's directory, so a job folder can be moved as a whole. S3 locations work as in
the cluster, with credentials from the AWS_* environment variables instead of the job's Secret.

Ctrl-C goes to the trainer processes themselves, which save a checkpoint at the end of the step and exit;
running the same command again resumes from it. Torch-free: torch is imported only by the trainer processes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from longcat_job.api import Location, LongCatI2VJob
from longcat_job.failures import EXIT_CODE_FILE_ENV, ExitCode
from longcat_job.parse import InvalidJob, load_job
from longcat_job.preflight import run_preflight
from longcat_job.progress import PROGRESS_KEY, TrainerProgress
from longcat_job.s3 import S3AccessError
from longcat_job.sample_manifest import MANIFEST_KEY, build_manifest, write_manifest
from longcat_job.storage import ObjectStore, store_for

from .terminal import ProgressView, local_path, print_summary

# What the trainer writes when it has saved a checkpoint (checkpoint.py's `latest`); read here to say "resuming".
LATEST_CHECKPOINT_KEY = "checkpoints/latest"
METRICS_PORT_ENV = "LONGCAT_METRICS_PORT"  # metrics.py's (which imports torch: this module must not)
POLL_S = 0.5


Say = Callable[..., None]  # print-like: say(text, file=sys.stderr)


class RunRefused(Exception):
    """The job cannot start on this machine; the message says why and what to do. Nothing was started."""


def absolute(path: str, base: Path) -> str:
    """A local path of the job file as an absolute plain path (`file://` dropped, `~` expanded)."""
    plain = Path(path.removeprefix("file://")).expanduser()
    return str(plain if plain.is_absolute() else (base / plain).resolve())


def resolve_paths(job: LongCatI2VJob, base: Path) -> LongCatI2VJob:
    """The job as the trainer receives it: every local path absolute against `base`, no status."""
    job = job.model_copy(deep=True)
    job.status = None
    spec = job.spec
    locations: list[Location] = [spec.output] + [d.source for d in spec.datasets]
    locations += [d.vae_cache for d in spec.datasets if d.vae_cache is not None]
    for location in locations:
        if location.local is not None:
            location.local.path = absolute(location.local.path, base)
    if not spec.model.source.startswith(("hf://", "s3://")):
        spec.model.source = absolute(spec.model.source, base)
    return job


def load_for_run(path: Path) -> LongCatI2VJob:
    """The job file's one job, paths resolved; raises InvalidJob (field paths) or OSError."""
    return resolve_paths(load_job(path), path.resolve().parent)


def visible_gpus() -> int:
    """GPUs this machine offers, without importing torch (CUDA_VISIBLE_DEVICES, else `nvidia-smi -L`)."""
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU ") for line in listed.splitlines())


def read_progress(output: ObjectStore, since: datetime | None = None) -> TrainerProgress | None:
    """progress.json, or None while there is none (or only an older run's, when `since` is given)."""
    try:
        doc = TrainerProgress.from_json(output.get_bytes(PROGRESS_KEY))
    except (FileNotFoundError, S3AccessError, ValueError):  # not written yet (ValueError: caught mid-upload)
        return None
    return doc if since is None or doc.updated >= since else None


def _exists(output: ObjectStore, key: str) -> bool:
    try:
        output.stat(key)
    except (FileNotFoundError, S3AccessError):
        return False
    return True


def prepare_output(job: LongCatI2VJob, output: ObjectStore, say: Say = print) -> None:
    """Preflight and manifest.json, as the operator does at launch; a job with a manifest already is resumed."""
    if _exists(output, MANIFEST_KEY):
        say(f"manifest: {output.url.rstrip('/')}/{MANIFEST_KEY} (frozen by an earlier run: its samples are used)")
        return
    result = run_preflight(job.spec)
    for line in result.report.lines():
        say(f"preflight: {line}")
    if not result.report.ok:
        raise RunRefused("preflight found the problems above: fix the data or the job's dataset locations")
    say(f"manifest: {write_manifest(output, build_manifest(job.metadata.name or 'job', job.spec, result))}")


def torchrun_command(config: Path, processes: int) -> list[str]:
    """The pods' launch (gang.torchrun_command) for one machine: a standalone rendezvous on localhost."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
            "-m", "longcat_trainer", "--config", str(config)]


class SignalForwarder:
    """Ctrl-C and SIGTERM go to the trainer processes themselves.

    torchrun runs in its own session, so the terminal's Ctrl-C reaches only this process; passing the signal
    to the workers (not to torchrun, which would kill them after its 30 s shutdown timeout) lets a long step
    finish and the checkpoint be written. A second Ctrl-C makes the workers stop at once.
    """

    def __init__(self, launcher: subprocess.Popen, say: Say) -> None:
        self.launcher, self.say, self.received = launcher, say, 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalForwarder:
        import psutil  # noqa: PLC0415 - installed with the trainer, which `run` needs anyway

        self._psutil = psutil
        self._previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        psutil = self._psutil
        self.received += 1
        if self.received == 1:
            self.say(f"\n{signal.Signals(signum).name}: the trainer saves a checkpoint at the end of this step "
                     "(Ctrl-C again to stop at once, without one)")
        try:
            workers = psutil.Process(self.launcher.pid).children()
        except psutil.NoSuchProcess:
            return
        for process in workers or [psutil.Process(self.launcher.pid)]:  # none yet: torchrun stops the start
            try:
                process.send_signal(signum)
            except psutil.NoSuchProcess:
                pass


def run_job(job_path: Path, *, processes: int | None = None, cpu: bool = False, say: Say = print) -> int:
    """The whole local run; returns the exit code (0 done, 1 refused, 143 stopped with a checkpoint, ...)."""
    try:
        job = load_for_run(job_path)
    except InvalidJob as exc:
        for error in exc.errors:
            say(f"{job_path}: {error}", file=sys.stderr)
        return ExitCode.ERROR
    except OSError as exc:
        say(f"{job_path}: cannot read: {exc.strerror}", file=sys.stderr)
        return ExitCode.ERROR
    try:
        return _run(job, job_path, processes, cpu, say)
    except RunRefused as exc:
        say(f"{job_path}: {exc}", file=sys.stderr)
        return ExitCode.ERROR
    except KeyboardInterrupt:  # Ctrl-C before the trainer started (during preflight): nothing to save
        say("stopped before training started", file=sys.stderr)
        return ExitCode.INTERRUPTED


def _run(job: LongCatI2VJob, job_path: Path, processes: int | None, cpu: bool, say: Say) -> int:
    if importlib.util.find_spec("torch") is None:
        raise RunRefused("training needs the trainer's packages: pip install 'longcat-i2v[trainer]' "
                         "(or scripts/setup-venv operator,trainer)")
    gpus = 0 if cpu else visible_gpus()
    processes = processes or max(gpus, 1)
    if gpus and processes > gpus:
        raise RunRefused(f"--gpus {processes}: this machine shows {gpus} GPUs")
    output = store_for(job.spec.output, what="output (spec.output)")
    try:
        previous = read_progress(output)
        if (previous is not None and previous.phase == "Succeeded"
                and previous.progress.max_steps == job.spec.training.max_steps):
            say(f"{job_path}: this job finished already (delete {local_path(output.url)} to train again)")
            print_summary(previous, output.url, say)
            return 0
        prepare_output(job, output, say)
        if _exists(output, LATEST_CHECKPOINT_KEY):
            step = json.loads(output.get_bytes(LATEST_CHECKPOINT_KEY))["step"]
            say(f"resuming from the checkpoint of step {step}")
    except S3AccessError as exc:
        raise RunRefused(str(exc)) from None

    work = Path(tempfile.mkdtemp(prefix=f"longcat-run-{job.metadata.name or 'job'}-"))
    config = work / "job.json"
    config.write_text(job.model_dump_json(by_alias=True, exclude_none=True, indent=2), encoding="utf-8")
    exit_file, log_file = work / "exit-code", work / "trainer.log"
    env = {**os.environ, EXIT_CODE_FILE_ENV: str(exit_file)}
    env.setdefault(METRICS_PORT_ENV, "0")  # no metrics server unless asked: a second run would find the port taken
    if cpu or not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    where = f"{processes} GPU{'s' if processes > 1 else ''}" if gpus else \
        f"the CPU ({processes} process{'es' if processes > 1 else ''})"
    say(f"training on {where}; trainer log: {log_file}")

    started = datetime.now(UTC)
    with log_file.open("wb") as log, ProgressView(job.spec.training.max_steps, log_file, say) as view:
        launcher = subprocess.Popen(torchrun_command(config, processes), env=env, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        with SignalForwarder(launcher, view.say) as signals:
            while launcher.poll() is None:
                view.update(read_progress(output, since=started))
                time.sleep(POLL_S)
        final = read_progress(output, since=started)
        view.update(final)
    code = int(exit_file.read_text()) if exit_file.is_file() else launcher.returncode
    return _report(final, code, launcher.returncode, signals.received > 0, job_path, output, log_file, say)


def _report(final: TrainerProgress | None, code: int, launcher_code: int, interrupted: bool, job_path: Path,
            output: ObjectStore, log_file: Path, say: Say) -> int:
    """Say how the run ended; returns the command's exit code."""
    if final is not None and final.phase == "Succeeded" and launcher_code == 0:
        print_summary(final, output.url, say)
        return 0
    again = f"run the same command again to resume: longcat-i2v run {job_path}"
    if final is not None and final.phase == "Preempted":
        say(f"stopped at step {final.progress.step} with a checkpoint "
            f"({local_path(final.artifacts.latest_checkpoint or '')}); {again}")
        return ExitCode.PREEMPTED
    if interrupted:
        say(f"stopped (the checkpoints and caches written so far are kept); {again}")
        return ExitCode.INTERRUPTED
    if final is not None and final.failure is not None:
        say(f"failed ({final.failure.reason}): {final.failure.message}", file=sys.stderr)
    else:
        say(f"the trainer stopped with exit code {code}; its log ends:", file=sys.stderr)
        say("".join(log_file.read_text(errors="replace").splitlines(keepends=True)[-30:]), file=sys.stderr)
    say(f"trainer log: {log_file}", file=sys.stderr)
    return code or ExitCode.ERROR
