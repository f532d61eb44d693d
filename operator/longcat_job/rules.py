"""Validation rules defined once for both places that enforce them.

Each rule carries the CEL expression the API server evaluates (emitted into the CRD as
`x-kubernetes-validations`) and the Python check that `longcat-i2v validate`, the webhook and the trainer
run, with one message for both, so `kubectl apply` and the CLI refuse the same job with the same words.
The Python side reports exact paths (`datasets[1].conditioningData[0]`); CEL can only name the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

CEL_KEY = "x-kubernetes-validations"


@dataclass(frozen=True)
class FieldRule:
    """A rule on one value; `cel` sees it as `self`. Use inside `Annotated[...]`."""

    cel: str
    message: str
    check: Callable[[Any], bool]

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def validate(value: Any) -> Any:
            if value is not None and not self.check(value):
                raise PydanticCustomError("longcat_rule", self.message)
            return value

        return core_schema.no_info_after_validator_function(validate, handler(source))

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        json_schema = handler(schema)
        json_schema.setdefault(CEL_KEY, []).append({"rule": self.cel, "message": self.message})
        return json_schema


@dataclass(frozen=True)
class Immutable:
    """A transition rule: the API server refuses updates that change the value. Use inside `Annotated[...]`."""

    field: str

    def __get_pydantic_json_schema__(self, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> dict:
        json_schema = handler(schema)
        message = f"{self.field} is immutable after creation: delete the job and create a new one to change it"
        json_schema.setdefault(CEL_KEY, []).append({"rule": "self == oldSelf", "message": message})
        return json_schema


@dataclass(frozen=True)
class ObjectRule:
    """A rule across fields of one object. `violations` yields the relative path of each offending value."""

    cel: str
    field_path: str
    message: str
    violations: Callable[[Any], Iterable[str]]

    def as_cel(self) -> dict:
        return {"rule": self.cel, "fieldPath": self.field_path, "message": self.message}


def regex_rule(pattern: str, message: str) -> FieldRule:
    """A string rule by regular expression, in the syntax shared by RE2 (CEL) and Python."""
    compiled = re.compile(pattern)
    cel_literal = pattern.replace("\\", "\\\\").replace("'", "\\'")
    return FieldRule(
        cel=f"self.matches('{cel_literal}')",
        message=message,
        check=lambda value: compiled.search(value) is not None,
    )


def multiple_of(n: int, message: str) -> FieldRule:
    return FieldRule(cel=f"self % {n} == 0", message=message, check=lambda value: value % n == 0)


def at_most(limit: int, message: str) -> FieldRule:
    """An upper bound whose message says why (a bare maximum only says that it was exceeded)."""
    return FieldRule(cel=f"self <= {limit}", message=message, check=lambda value: value <= limit)
