"""The keys a job writes under its output location, named once: the trainer writes them, the UI server
(longcat_ui) and the operator read them.

    progress.json                         phase, step, ETA, artifacts, bad samples (progress.py)
    job.json                              the job as the trainer ran it (the preview's model and sizes)
    manifest.json                         the frozen sample list (sample_manifest.py)
    loss.json, loss.png                   (step, loss, lr) of every step, and its plot
    index.html                            the static report: opens from disk or S3 without a server
    validation/index.json                 every validation step's files
    validation/inputs/<i>-<stem>.<ext>    sample i's start frame and source clip, copied for the report
    validation/step-<N>/<i>-<stem>.mp4    sample i generated after step N (and its .png contact sheet)
    lora/<file>                           the final LoRA, one file per format (lora_files.FORMAT_FILES)
    lora/ema/<file>                       the same of the adapters' EMA (training.ema), also in checkpoints
    checkpoints/step-<N>/                 a resumable checkpoint: state.pt and the LoRA files of that step
    checkpoints/latest                    which checkpoint a resumed run starts from
"""

from __future__ import annotations

PROGRESS = "progress.json"
JOB = "job.json"
MANIFEST = "manifest.json"
LOSS_HISTORY = "loss.json"
LOSS_CURVE = "loss.png"
INDEX_HTML = "index.html"
VALIDATION = "validation"
VALIDATION_INDEX = f"{VALIDATION}/index.json"
VALIDATION_INPUTS = f"{VALIDATION}/inputs"
LORA = "lora/"
EMA = "ema/"  # under lora/ and each checkpoint
CHECKPOINTS = "checkpoints/"
LATEST_CHECKPOINT = CHECKPOINTS + "latest"
CHECKPOINT_STATE = "state.pt"


def validation_step(step: int) -> str:
    return f"{VALIDATION}/step-{step}"


def checkpoint_prefix(step: int) -> str:
    return f"{CHECKPOINTS}step-{step:08d}/"
