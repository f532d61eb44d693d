"""Turns a job document into a `LongCatI2VJob`, or into a list of errors that each name their field path.

Used by `longcat-i2v validate`, the webhook and the operator, so every place words a refusal the same way, and
judges a document as the API server does (tests/test_rules_agree.py checks it against the real one):
fields by their camelCase names only (`learning_rate` is an unknown field there too), and a null value the same
as an absent field (the API server prunes nulls before it applies defaults).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ValidationError

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


def _field_names(model: type[BaseModel], loc: tuple[str | int, ...]) -> dict[str, str]:
    """Python name -> YAML name of the fields of the model found at `loc` below `model` ({} when none)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        if field is None:
            return {}
        nested = [t for t in _types(field.annotation) if isinstance(t, type) and issubclass(t, BaseModel)]
        if not nested:
            return {}
        model = nested[0]
    return {name: field.alias or name for name, field in model.model_fields.items()}


def _types(annotation: Any) -> list[Any]:
    """The types inside Optional[...], list[...], Annotated[...]."""
    found, todo = [], [annotation]
    while todo:
        current = todo.pop()
        args = get_args(current)
        if args:
            todo += list(args)
        else:
            found.append(current)
    return found


def _unknown_field_message(loc: tuple[str | int, ...]) -> str:
    key = loc[-1]
    names = _field_names(LongCatI2VJob, loc[:-1])
    if isinstance(key, str) and key in names and names[key] != key:
        return f"is not a field: fields are camelCase, write {names[key]}"
    return _HINTS["extra_forbidden"]


def errors_of(exc: ValidationError) -> list[FieldError]:
    errors = []
    for error in exc.errors(include_url=False):
        path = field_path(error["loc"])
        if error["type"] == "longcat_object_rule":
            errors.extend(FieldError(_join(path, rel), message) for rel, message in error["ctx"]["problems"])
        elif error["type"] == "extra_forbidden":
            errors.append(FieldError(path, _unknown_field_message(error["loc"])))
        else:
            errors.append(FieldError(path, _HINTS.get(error["type"], error["msg"])))
    return errors


def as_the_api_server_reads(value: Any, model: type[BaseModel] | None = LongCatI2VJob) -> Any:
    """The document as the API server validates it: a declared field whose value is null is removed, as if absent
    (an undeclared one stays, to be refused as unknown whatever its value; so do null list entries), and a
    whole-number float in an integer field is that integer (JSON has one number type: 1.0 is a valid integer)."""
    if isinstance(value, list):
        return [as_the_api_server_reads(v, model) for v in value]
    if not isinstance(value, dict):
        return value
    if model is None:  # a free-form map (nodeSelector): its null values are pruned too
        return {k: v for k, v in value.items() if v is not None}
    fields = {field.alias or name: field for name, field in model.model_fields.items()}
    out = {}
    for key, item in value.items():
        field = fields.get(key)
        if field is None:
            out[key] = item
            continue
        if item is None:
            continue
        types = _types(field.annotation)
        if isinstance(item, float) and item.is_integer() and int in types and float not in types:
            item = int(item)
        nested = [t for t in types if isinstance(t, type) and issubclass(t, BaseModel)]
        out[key] = as_the_api_server_reads(item, nested[0] if nested else None)
    return out


def parse_job(document: Any) -> LongCatI2VJob:
    """Validates one parsed document; raises `InvalidJob` with every error found."""
    if not isinstance(document, dict):
        raise InvalidJob([FieldError("(document)", "a job file must be a YAML mapping with apiVersion, kind and spec")])
    try:
        return LongCatI2VJob.model_validate(as_the_api_server_reads(document), by_alias=True, by_name=False)
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
