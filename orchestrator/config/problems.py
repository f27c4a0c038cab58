"""Problems with a job and how they are told: Problem (a key, what is wrong, the fix), ConfigError (every
problem at once), and each schema error pydantic raises said in the job file's words (pydantic_problems):
the value given, what is allowed (a field's bounds: bounds, bounds_text, number_text) and how to fix it."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from orchestrator.config.job import JobConfig
from orchestrator.config.tune import Dimension, TuneConfig


@dataclass(frozen=True)
class Problem:
    path: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" + (f" (fix: {self.fix})" if self.fix else "")


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


# What a value should have been, for each pydantic type error, in the words a job file uses.
_EXPECTED = {
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_parsing_size": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "tuple_type": "a list",
    "dict_type": "a mapping of keys",
    "model_type": "a section of keys",
    "model_attributes_type": "a section of keys",
}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def pydantic_problems(err: ValidationError) -> list[Problem]:
    """Each schema error as a Problem that echoes the value given, says what is allowed and how to fix it."""
    # load_search validates tune: and each searched dimension on their own: their locations start there
    root = {"TuneConfig": TuneConfig, "Dimension": Dimension}.get(err.title, JobConfig)
    problems = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if p != "[key]"]  # a mapping's bad key: pydantic adds "[key]" after it
        path = ".".join(loc) or "(job)"
        kind = e["type"]
        if kind == "extra_forbidden":
            known = _known_keys(loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            fix = f"did you mean `{close[0]}`?" if close else f"remove it; known keys: {', '.join(known)}"
            problems.append(Problem(path, "unknown key", fix))
            continue
        field, section = _schema_at(loc, root)
        given = _shown(e.get("input"))
        if kind == "missing":
            problems.append(Problem(path, e["msg"], "add it to the job file"))
        elif kind == "literal_error":
            expected = e["ctx"]["expected"]
            problems.append(Problem(path, f"got {given}: expected {expected}", f"use {expected}"))
        elif kind in _RANGE_ERRORS:
            problems.append(_range_problem(path, field, e["ctx"], given))
        elif kind in ("model_type", "model_attributes_type") and section is not None:
            problems.append(_section_problem(path, section, given))
        elif kind in _EXPECTED:
            example = _example(field)
            fix = f"set {path} to {_EXPECTED[kind]}" + (f", e.g. {example}" if example else "")
            problems.append(Problem(path, f"got {given}: expected {_EXPECTED[kind]}", fix))
        else:
            if field is not None:
                doc = field.description
            else:  # the whole of `root` (an empty location), or past the schema's named keys
                doc = section.__doc__ if section is not None else None
            fix = f"see its doc: {' '.join(doc.split())}" if doc else f"see {path} in the job schema (orchestrator/config/sections.py)"
            problems.append(Problem(path, e["msg"].replace("Input should be", "should be"), fix))
    return problems


def _schema_at(loc: list[str], root: type[BaseModel]) -> tuple[FieldInfo | None, type[BaseModel] | None]:
    """The field an error location names and, when it is a section, the section's model (`root` for an empty
    location). Both None once the location leaves named keys (a list index, a dict key, a union member)."""
    field: FieldInfo | None = None
    model: type[BaseModel] | None = root
    for part in loc:
        field = model.model_fields.get(part) if model else None
        if field is None:
            return None, None
        # a section may be optional (`DeepSpeedConfig | None`): look inside the union, as _known_keys does
        sections = [t for t in (field.annotation, *get_args(field.annotation)) if isinstance(t, type) and issubclass(t, BaseModel)]
        model = sections[0] if sections else None
    return field, model


def _range_problem(path: str, field: FieldInfo | None, ctx: Mapping[str, Any], given: str) -> Problem:
    """A number out of range, with the field's whole allowed range read from its Ge/Gt/Le/Lt constraints
    (pydantic's error names only the bound broken, which is all there is without a field)."""
    found: dict[str, Any] = {**ctx, **bounds(field)}
    limits = {op: found[op] for op in _BOUNDS if op in found}  # lower bound first
    allowed = bounds_text(limits)
    if set(limits) == {"ge", "le"}:
        allowed_words = f"from {number_text(limits['ge'])} to {number_text(limits['le'])}"
    else:
        allowed_words = allowed
    return Problem(path, f"{given} is out of range: must be {allowed}", f"set {path} to {_number_kind(field)} {allowed_words}")


def bounds(field: FieldInfo | None) -> dict[str, Any]:
    """A field's numeric bounds from its Ge/Gt/Le/Lt constraints, lower bound first: {"ge": 1, "le": 8}."""
    found: dict[str, Any] = {}
    for constraint in field.metadata if field else []:
        if isinstance(constraint, (Ge, Gt, Le, Lt)):
            found.update((op, getattr(constraint, op)) for op in _BOUNDS if hasattr(constraint, op))
    return {op: found[op] for op in _BOUNDS if op in found}


def bounds_text(limits: Mapping[str, Any]) -> str:
    """{"ge": 1, "le": 8} -> ">= 1 and <= 8", as the job file's errors and its reference say it."""
    return " and ".join(f"{_BOUNDS[op]} {number_text(value)}" for op, value in limits.items())


def number_text(value: float) -> str:
    """A bound as a job file would write it: 1, not 1.0; 0.5 as is."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _number_kind(field: FieldInfo | None) -> str:
    annotation = field.annotation if field else None
    return "a whole number" if int in (annotation, *get_args(annotation)) else "a number"


def _shown(value: Any) -> str:
    """A value as given, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _example(field: FieldInfo | None) -> str | None:
    """The field's default as a job file writes it, to show as an example; None when it has none worth showing."""
    default = None if field is None or field.is_required() else field.default
    if not isinstance(default, (bool, int, float, str, list)) or default in ("", []):
        return None
    return default if isinstance(default, str) else json.dumps(default)


def _section_problem(path: str, section: type[BaseModel], given: str) -> Problem:
    """A section (a mapping of keys) given a scalar or a list: name its keys, never the model behind it."""
    keys = list(section.model_fields)
    listed = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    example = _example(section.model_fields[keys[0]]) or "..."
    if path == "(job)":  # a searched dimension, validated on its own
        return Problem(path, f"expected a section of keys ({listed}), got {given}", f"give one of its keys, e.g. {{{keys[0]}: {example}}}")
    return Problem(path, f"{path} is a section of keys ({listed}), got {given}", f"set one of its keys, e.g. --set {path}.{keys[0]}={example}")


def _known_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = JobConfig
    for part in loc:
        field = model.model_fields.get(part)
        # a section may be optional (`DeepSpeedConfig | None`): look inside the union
        sections = [t for t in (field.annotation, *get_args(field.annotation)) if isinstance(t, type) and issubclass(t, BaseModel)] if field else []
        if not sections:
            return []
        model = sections[0]
    return list(model.model_fields)
