"""The shape of the code: the packages' import DAG, names that do not look alike, reconcile functions that fit a screen."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = [ROOT / "operator" / "longcat_job", ROOT / "operator" / "longcat_operator",
            ROOT / "trainer_image" / "longcat_trainer"]


def test_import_contracts_hold() -> None:
    """pyproject.toml's contracts: job <- trainer <- (lazily) the CLI, job <- operator, the UI touching the trainer
    only from its preview worker; data/ without cache/."""
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5 kept, 0 broken" in result.stdout, result.stdout


def test_the_trainer_image_never_names_the_operator() -> None:
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "trainer_image").rglob("*")
                 if p.is_file() and p.suffix in (".py", "") and "longcat_operator" in p.read_text(errors="replace")]
    assert offenders == []


def _looks_alike(a: str, b: str) -> bool:
    """One name is the other plus a short suffix (manifest/manifests, progress/progress_view), or they differ
    by one letter (validate/validation would differ by more, and is caught as a stem plus suffix)."""
    short, long = sorted((a, b), key=len)
    if long.startswith(short) and len(long) - len(short) <= 5:
        return True
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    return False


def test_no_two_modules_have_names_that_look_alike() -> None:
    stems = sorted({p.stem for package in PACKAGES for p in package.rglob("*.py") if p.stem != "__init__"}
                   | {p.name for package in PACKAGES for p in package.rglob("*") if p.is_dir() and p.name != "__pycache__"})
    alike = [(a, b) for a, b in itertools.combinations(stems, 2) if _looks_alike(a, b)]
    assert alike == []


def test_no_reconcile_function_is_longer_than_a_screen() -> None:
    for module in ("reconcile", "decide", "read", "apply", "status"):
        tree = ast.parse((ROOT / "operator" / "longcat_operator" / f"{module}.py").read_text())
        lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(tree)
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert max(lengths.values()) < 60, (module, lengths)
