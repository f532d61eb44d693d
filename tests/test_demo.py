"""`longcat-i2v demo`, as the README and CI run it: every file it names exists and decodes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
from PIL import Image
from safetensors.torch import load_file

from longcat_job.api import DEFAULT_MODEL_SOURCE
from longcat_job.parse import load_job
from longcat_job.progress import TrainerProgress

CLI = str(Path(sys.executable).with_name("longcat-i2v"))
DEMO_BUDGET_S = 180  # the promise on a 2-core machine


def printed(stdout: str, what: str) -> Path:
    match = re.search(rf"^  {what}: +(\S+)$", stdout, re.MULTILINE)
    assert match, f"the demo printed no {what!r} line:\n{stdout}"
    return Path(match.group(1))


@pytest.mark.slow
def test_demo_trains_a_tiny_job_end_to_end_and_says_what_it_was(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    env = {**os.environ, "LONGCAT_DATA_CACHE": str(tmp_path / "data-cache")}
    started = time.monotonic()
    result = subprocess.run([CLI, "demo", "--dir", str(demo)], capture_output=True, text=True,
                            timeout=2 * DEMO_BUDGET_S, env=env)
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    stdout = result.stdout
    assert seconds < DEMO_BUDGET_S, f"demo took {seconds:.0f}s"

    # What it trained on and with: a job file the CLI validates, naming the tiny model beside it.
    job = load_job(demo / "job.yaml")
    assert job.spec.model.source == "model" and (demo / "model/dit/config.json").is_file()
    assert len(list((demo / "data/clips").glob("*.mp4"))) == len(list((demo / "data/start_frames").glob("*.png")))
    assert "TINY RANDOM" in stdout and f"model: {{source: {DEFAULT_MODEL_SOURCE}}}" in stdout
    assert f"source: {DEFAULT_MODEL_SOURCE}" in (demo / "job.yaml").read_text()  # the one-line change, shown there too

    lora = load_file(printed(stdout, "LoRA"))
    assert lora and any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # trained, not initial zeros

    video = printed(stdout, "video")
    with av.open(str(video)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    height, width = (int(v) for v in job.spec.validation.resolution.split("x"))
    assert len(frames) == job.spec.validation.frames and frames[0].shape == (height, width, 3)

    with Image.open(printed(stdout, "contact sheet")) as sheet:
        sheet.load()
        assert sheet.width > width
    with Image.open(printed(stdout, "loss curve")) as curve:
        curve.load()
    assert "<video" in printed(stdout, "report").read_text()
    assert f"longcat-i2v serve --output {demo / 'output'}" in stdout  # tests/test_ui_browser.py serves it

    progress = TrainerProgress.from_json((demo / "output/progress.json").read_bytes())
    assert progress.phase == "Succeeded" and progress.progress.step == job.spec.training.max_steps

    # A second demo trains nothing: it names the same files at once.
    again = subprocess.run([CLI, "demo", "--dir", str(demo)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "finished already" in again.stdout
    assert printed(again.stdout, "video") == video
    print(f"longcat-i2v demo: {seconds:.1f}s")
