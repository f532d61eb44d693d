"""Loads every fixture module under tests/fixtures/ (real S3 server, real control plane, ...)."""

from pathlib import Path

pytest_plugins = sorted(
    f"tests.fixtures.{path.stem}"
    for path in (Path(__file__).parent / "fixtures").glob("*.py")
    if not path.name.startswith("_")
)
