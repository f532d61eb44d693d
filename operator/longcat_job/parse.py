"""Turns a job document into a `LongCatI2VJob`, or into a list of errors that each name their field path.

Used by `longcat-i2v validate`, the webhook and the operator, so every place words a refusal the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .api import LongCatI2VJob
from .failures import InvalidConfigError

# Pydantic's wording for these says what is wrong but not what to do.
_HINTS = {
    "missing": "is required",
    "extra_forbidden": "is not a field of LongCatI2VJob: check its spelling (fields are camelCase, e.g. learningRate)",
}




class JobLoader(yaml.SafeLoader):
    """YAML as the API server reads it: `1e-4` is a float (YAML 1.2), not the string PyYAML's 1.1 makes of it."""


JobLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)$"),
    list("-+.0123456789"),
)


@dataclass(frozen=True)
class FieldError:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class InvalidJob(InvalidConfigError):
    def __init__(self, errors: list[FieldError]):
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


def field_path(loc: tuple[str | int, ...]) -> str:
    """('spec', 'datasets', 1, 'frames') -> 'spec.datasets[1].frames'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(document)"


def _join(base: str, relative: str) -> str:
    if base == "(document)":
        return relative
    return f"{base}{relative}" if relative.startswith("[") else f"{base}.{relative}"


def errors_of(exc: ValidationError) -> list[FieldError]:
    errors = []
    for error in exc.errors(include_url=False):
        path = field_path(error["loc"])
        if error["type"] == "longcat_object_rule":
            errors.extend(FieldError(_join(path, rel), message) for rel, message in error["ctx"]["problems"])
        else:
            errors.append(FieldError(path, _HINTS.get(error["type"], error["msg"])))
    return errors


def parse_job(document: Any) -> LongCatI2VJob:
    """Validates one parsed document; raises `InvalidJob` with every error found."""
    if not isinstance(document, dict):
        raise InvalidJob([FieldError("(document)", "a job file must be a YAML mapping with apiVersion, kind and spec")])
    try:
        return LongCatI2VJob.model_validate(document)
    except ValidationError as exc:
        raise InvalidJob(errors_of(exc)) from None


def load_documents(path: Path) -> list[Any]:
    """The YAML documents of a file; a syntax error becomes an `InvalidJob` naming the line."""
    try:
        return [doc for doc in yaml.load_all(path.read_text(encoding="utf-8"), Loader=JobLoader) if doc is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise InvalidJob([FieldError("(document)", f"not valid YAML at {where}: {getattr(exc, 'problem', exc)}")])


def load_job(path: Path) -> LongCatI2VJob:
    """The single job of a file (what `longcat-i2v run` and the trainer read)."""
    documents = load_documents(path)
    if len(documents) != 1:
        raise InvalidJob([FieldError("(document)", f"expected exactly one job in {path}, found {len(documents)}")])
    return parse_job(documents[0])
