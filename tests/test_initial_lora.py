"""lora.initFrom: a job starts from a LoRA of ours in either format (same outputs as the LoRA it read, whatever
the spec's alpha), refuses one of another rank or targets by name, and resumes from its own checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from longcat_job.api import Location, LoraSpec
from longcat_job.failures import InvalidConfigError
from longcat_job.parse import parse_job
from longcat_job.preflight import run_preflight
from longcat_job.storage import LocalStore
from longcat_trainer import lora, train
from longcat_trainer.data.synthetic import write_shapes_dataset
from longcat_trainer.initial_lora import initial_lora_state
from tests.fixtures.training import job_document, location, with_vae_cache
from tests.test_lora import inputs, tiny_dit

SPEC = LoraSpec(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A LoRA as if trained (B not zero), in a folder per format, and the output of the DiT it adapts."""
    root = tmp_path_factory.mktemp("init-lora")
    trained = lora.add_lora(tiny_dit(), SPEC)
    for name, param in trained.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    files = lora.export_files(lora.lora_state(trained), SPEC)
    for folder, names in {"peft": (lora.PEFT_WEIGHTS, lora.PEFT_CONFIG), "official": (lora.OFFICIAL_WEIGHTS,)}.items():
        for name in names:
            (root / folder).mkdir(exist_ok=True)
            (root / folder / name).write_bytes(files[name])
    with torch.no_grad():
        return root, trained(**inputs())


def spec_from(folder: Path, **changes: object) -> LoraSpec:
    fields = {**SPEC.model_dump(), "init_from": Location.model_validate({"local": {"path": str(folder)}}), **changes}
    return LoraSpec.model_validate(fields)


@pytest.mark.parametrize("fmt", ["peft", "official"])
@pytest.mark.parametrize("alpha", [8.0, 2.0, None])
def test_the_job_starts_from_the_model_the_file_describes(exported: tuple[Path, torch.Tensor], fmt: str,
                                                          alpha: float | None) -> None:
    root, expected = exported
    spec = spec_from(root / fmt, alpha=alpha)
    start = initial_lora_state(spec, tiny_dit())
    dit = lora.add_lora(tiny_dit(), spec)
    lora.load_lora_state(dit, start)
    with torch.no_grad():
        assert torch.allclose(dit(**inputs()), expected, atol=1e-5)
        assert not torch.allclose(lora.add_lora(tiny_dit(), spec)(**inputs()), expected, atol=1e-3)


def test_another_rank_or_targets_are_refused_by_name(exported: tuple[Path, torch.Tensor], tmp_path: Path) -> None:
    root, _ = exported
    with pytest.raises(InvalidConfigError, match=r"initFrom: .*peft/pytorch_lora_weights.safetensors has rank 4 "
                                                 r"but spec.lora.rank is 2: set spec.lora.rank"):
        initial_lora_state(spec_from(root / "peft", rank=2), tiny_dit())
    with pytest.raises(InvalidConfigError, match=r"adapts \['kv_linear', 'proj', 'q_linear', 'qkv'\] but "
                                                 r"spec.lora.targets is \['qkv'\]"):
        initial_lora_state(spec_from(root / "official", targets=["qkv"]), tiny_dit())
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidConfigError, match=r"holds neither pytorch_lora_weights.safetensors nor "
                                                 r"longcat_video_lora.safetensors"):
        initial_lora_state(spec_from(tmp_path / "empty"), tiny_dit())


def shapes_job(model: Path, shapes: Path, out: Path, init: Path, steps: int) -> dict:
    doc = job_document(model, location(shapes / "clips"), location(shapes / "start_frames"), location(out),
                       training={"maxSteps": steps, "checkpointEvery": 1})
    doc["spec"]["lora"] = {"rank": 4, "alpha": 8.0, "initFrom": location(init)}
    return with_vae_cache(doc, location(shapes / "cache/clips"), location(shapes / "cache/frames"))


def test_preflight_refuses_a_lora_of_another_rank(exported: tuple[Path, torch.Tensor], tmp_path: Path,
                                                  tiny_checkpoint: Path) -> None:
    root, _ = exported
    write_shapes_dataset(LocalStore(tmp_path / "shapes"), count=1, frames=9, height=64, width=112)
    doc = shapes_job(tiny_checkpoint, tmp_path / "shapes", tmp_path / "out", root / "official", 1)
    doc["spec"]["lora"]["rank"] = 8
    report = run_preflight(parse_job(doc).spec).report
    assert not report.ok
    assert any("has rank 4 but spec.lora.rank is 8" in line for line in report.lines())


@pytest.mark.slow
def test_a_job_started_from_a_lora_resumes_from_its_checkpoint(exported: tuple[Path, torch.Tensor], tmp_path: Path,
                                                               tiny_checkpoint: Path, trainer_env: None) -> None:
    init = tmp_path / "init"
    shutil.copytree(exported[0] / "official", init)
    shapes = tmp_path / "shapes"
    write_shapes_dataset(LocalStore(shapes), count=2, frames=9, height=64, width=112)
    train.run(parse_job(shapes_job(tiny_checkpoint, shapes, tmp_path / "straight", init, 2)))
    train.run(parse_job(shapes_job(tiny_checkpoint, shapes, tmp_path / "resumed", init, 1)))
    shutil.rmtree(init)  # the second attempt must not read it again
    steps: list[int] = []
    train.run(parse_job(shapes_job(tiny_checkpoint, shapes, tmp_path / "resumed", init, 2)),
              train.Hooks(after_step=lambda info: steps.append(info.step)))
    assert steps == [2]
    a = load_file(tmp_path / "straight/lora/pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "resumed/lora/pytorch_lora_weights.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    start = load_file(exported[0] / "peft" / lora.PEFT_WEIGHTS)
    assert all(not torch.allclose(a[k], start[k]) for k in a if "lora_B" in k)  # it trained on from there
