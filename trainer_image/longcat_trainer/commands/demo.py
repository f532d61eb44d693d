"""`longcat-i2v demo`: the whole product on this machine's CPU in a couple of minutes, with nothing to download.

Writes into one folder what a user brings to a real job, then runs it with `longcat-i2v run`:

    DIR/data/clips/         short clips of moving shapes with <stem>.txt captions (PyAV, H.264)
    DIR/data/start_frames/  each clip's first frame (PNG)
    DIR/model/              a tiny randomly initialised checkpoint in the official layout
    DIR/job.yaml            the job: local relative paths, tiny sizes, few steps, validation at the end
    DIR/output/             what training leaves: LoRA, checkpoints, validation MP4 + contact sheet, index.html

Inputs already in DIR are kept (a second `demo` resumes or reports the finished run, like a second `run`).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from longcat_job.api import DEFAULT_MODEL_SOURCE
from longcat_job.storage import LocalStore

from ..data.synthetic import write_shapes_dataset
from ..model.tiny import write_tiny_checkpoint
from .run import run_job

CLIPS = 3

# Sizes the tiny model trains on in seconds: 9 frames are 3 latent frames (the start frame and two to denoise),
# 64 px with a 16 px bucket grid gives the clips' own 64x112 bucket.
JOB_YAML = f"""\
# The demo job of `longcat-i2v demo`: the same file format as a cluster job; local paths are relative to
# this file. The model is a TINY RANDOMLY INITIALISED one, so the videos show what an untrained network
# draws: the point is the pipeline, not the pictures.
#
# To train the real LongCat-Video (13.6B, a GPU with 80 GB) on this data, change one line:
#   model: {{source: {DEFAULT_MODEL_SOURCE}}}
# and, for real clips, drop the tiny sizes below (the defaults are 480x832, 93 frames).
apiVersion: longcat.video/v1alpha1
kind: LongCatI2VJob
metadata:
  name: demo
spec:
  model: {{source: model}}
  lora: {{rank: 4}}
  training: {{maxSteps: 10, checkpointEvery: 5, learningRate: 1.0e-3, gradientCheckpointing: false}}
  datasets:
    - id: clips
      type: video
      isI2V: true
      captionStrategy: textfile
      source: {{local: {{path: data/clips}}}}
      conditioningData: [start-frames]
      resolution: 64
      frames: 9
    - id: start-frames
      type: conditioning
      source: {{local: {{path: data/start_frames}}}}
      resolution: 64
      frames: 9
  aspectBucketAlignment: 16
  validation: {{resolution: 64x112, frames: 9, numInferenceSteps: 4, maxSamples: 1}}
  output: {{local: {{path: output}}}}
"""


def write_inputs(root: Path, say: Any = print) -> Path:
    """Dataset, tiny checkpoint and job file under root (each only when absent); returns the job file."""
    root.mkdir(parents=True, exist_ok=True)
    data, model, job = root / "data", root / "model", root / "job.yaml"
    if not data.is_dir():
        _atomically(data, lambda tmp: write_shapes_dataset(LocalStore(tmp), count=CLIPS, frames=9, height=64,
                                                           width=112))
        say(f"wrote {CLIPS} clips of moving shapes with captions and start frames: {data}")
    if not model.is_dir():
        _atomically(model, write_tiny_checkpoint)
        say(f"wrote a tiny random checkpoint in the official layout: {model}")
    if not job.is_file():
        job.write_text(JOB_YAML, encoding="utf-8")
        say(f"wrote the job file: {job}")
    return job


def _atomically(target: Path, write: Any) -> None:
    """Write a folder under a temporary name and rename it, so an interrupted demo leaves no half folder."""
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    tmp.rename(target)


def run_demo(root: Path, say: Any = print) -> int:
    job = write_inputs(root, say)
    say(f"running {job} on the CPU with a TINY RANDOM model (the same code a cluster's pods run)")
    code = run_job(job, processes=1, cpu=True, say=say)
    if code == 0:
        say(f"Browse the job (curve, videos, previews) in a web page: longcat-i2v serve --output {root / 'output'}")
        say("")
        say("That was a tiny randomly initialised model: the video shows the pipeline works, not a trained model.")
        say(f"To train the real LongCat-Video on the same data, change one line of {job}:")
        say(f"    model: {{source: {DEFAULT_MODEL_SOURCE}}}")
        say(f"and run it on a GPU machine: longcat-i2v run {job}   (in a cluster: kubectl apply a job with S3 "
            "locations)")
    return code
