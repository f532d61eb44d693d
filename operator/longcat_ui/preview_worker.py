"""The preview's GPU side, the one module of the UI that imports torch and the trainer (lazily, so that the
job browser runs without them): whether this server can sample, and one sample."""

from __future__ import annotations

import importlib.util
import io
import tempfile
from collections.abc import Callable
from pathlib import Path

from .preview_queue import PreviewTask

# Without a GPU only a small local checkpoint (the demo's tiny model) samples in reasonable time.
CPU_MODEL_BYTES = 1 << 30


def unavailable(model_source: str | None) -> str | None:
    """Why this server cannot generate previews with that model, or None when it can."""
    if model_source is None:
        return ("this job's output has no job.json (a trainer older than the preview wrote it): "
                "start the server with --model SOURCE")
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("diffusers") is None:
        return "the preview needs the trainer's packages: pip install 'longcat-i2v[trainer]'"
    import torch  # noqa: PLC0415 - only to ask for a GPU

    if torch.cuda.is_available():
        return None
    local = Path(model_source.removeprefix("file://"))
    if "://" not in model_source and local.is_dir():
        size = sum(p.stat().st_size for p in (local / "dit").rglob("*") if p.is_file())
        if size <= CPU_MODEL_BYTES:
            return None
    return (f"no GPU here, and the model {model_source} is too large for the CPU: run the server where it has "
            "a GPU (in a cluster: the chart's ui.gpu: 1)")


class Mp4Generator:
    """The queue's `generate`: one preview's MP4. The model stays loaded between requests that name the same
    source (loading the 13.6B model is the slow part of a preview); called from the queue's one worker only."""

    def __init__(self) -> None:
        self.source: str | None = None
        self.model = None  # longcat_trainer.preview.PreviewModel of self.source

    def __call__(self, task: PreviewTask, on_step: Callable[[int, int], None]) -> bytes:
        import torch  # noqa: PLC0415

        from longcat_trainer import media  # noqa: PLC0415
        from longcat_trainer.denoise import DEFAULT_FPS  # noqa: PLC0415
        from longcat_trainer.model.sources import resolve_model_source  # noqa: PLC0415
        from longcat_trainer.preview import Preview, PreviewModel  # noqa: PLC0415

        if task.model_source != self.source:
            self.model = self.source = None  # the previous model goes before the next loads: one fits the card
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            self.model = PreviewModel(resolve_model_source(task.model_source), device)
            self.source = task.model_source
        with tempfile.TemporaryDirectory(prefix="longcat-preview-lora-") as folder:
            lora = None
            if task.lora_files:
                lora = Path(folder)
                for name, data in task.lora_files.items():
                    (lora / name).write_bytes(data)
            preview = Preview(self.model.model_root, io.BytesIO(task.image), task.image_name, task.prompt, task.spec,
                              lora=lora, lora_strength=task.lora_strength)
            frames = self.model.generate(preview, on_step)
        return media.mp4_bytes(frames, DEFAULT_FPS)
