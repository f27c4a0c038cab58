"""`rayft schema`: the job-file reference (docs/job-reference.md) and the JSON Schema, both from config.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from orchestrator import dotted, schema_doc
from orchestrator.cli import main
from orchestrator.config import JobConfig

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / "docs" / "job-reference.md"
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def reference_rows(text: str) -> dict[str, list[str]]:
    """key -> its cells (type, default, allowed, doc), from the reference's tables."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").replace("\\|", "\0").split("|")]
            rows[cells[0].strip("`")] = [c.replace("\0", "|") for c in cells[1:]]
    return rows


def reference_key(key: str) -> str | None:
    """A job file's dotted key as the reference names it (None: inside a free-form mapping)."""
    if key.startswith("tune.space."):  # tune.space.<a searched key>.<kind>
        return "tune.space.<key>." + key.split(".")[-1]
    if key.startswith("deepspeed.overrides."):
        return None
    return key


def test_reference_is_current():
    assert REFERENCE.read_text() == schema_doc.markdown(), (
        "docs/job-reference.md is stale (orchestrator/config/ changed): regenerate it with "
        f"`{schema_doc.COMMAND}`"
    )


def test_every_key_has_a_doc_type_and_default():
    rows = reference_rows(schema_doc.markdown())
    undocumented = [key for key, (_type, _default, _allowed, doc) in rows.items() if not doc]
    assert not undocumented, f"keys without a doc (give each field an attribute docstring in orchestrator/config/): {undocumented}"
    assert all(cells[0] and cells[1] for cells in rows.values())
    # every field of every section is a row, top-level keys included
    assert set(JobConfig.model_fields) <= set(rows)
    assert len(rows) == sum(len(s.rows) for s in schema_doc.sections()) > 100


def test_reference_states_types_defaults_and_allowed_values():
    rows = reference_rows(schema_doc.markdown())
    assert rows["train.lr"][:3] == ["number", "`0.0002`", "> 0 and <= 1"]
    assert rows["lora.rank"][2] == ">= 1 and <= 1024"
    assert rows["method"][:3] == ["string", "`qlora`", "`full` | `lora` | `qlora`"]
    assert rows["model"][1] == "required"
    assert rows["deepspeed.stage"][2] == "`0` | `1` | `2` | `3`"
    assert rows["tune.mode"][2] == "`max` | `min` | `null`"
    assert rows["lora.targets"][2] == "`auto`, or a list of string"
    assert rows["submit.ship"][2] == "each item one of `model` | `data`"
    assert "tune.space.<key>.loguniform" in rows and "tracking.mlflow.tracking_uri" in rows


def test_shipped_job_files_use_only_documented_keys():
    rows = reference_rows(REFERENCE.read_text())
    for path in EXAMPLES:
        keys = {reference_key(k) for k in dotted.flatten(yaml.safe_load(path.read_text()))} - {None}
        assert keys <= set(rows), (path.name, sorted(keys - set(rows)))


def test_schema_command_prints_the_reference_and_the_json_schema():
    runner = CliRunner()
    markdown = runner.invoke(main, ["schema", "--markdown"], catch_exceptions=False)
    assert markdown.exit_code == 0 and markdown.output == schema_doc.markdown()
    by_default = runner.invoke(main, ["schema"], catch_exceptions=False)
    as_json = runner.invoke(main, ["schema", "--json"], catch_exceptions=False)
    assert by_default.exit_code == as_json.exit_code == 0 and by_default.output == as_json.output
    schema = json.loads(as_json.output)
    assert schema == json.loads(json.dumps(schema_doc.json_schema()))
    assert set(schema["properties"]) == set(JobConfig.model_fields)
    assert set(schema["required"]) == {"model", "data"} and schema["additionalProperties"] is False
    lr = resolve(schema, "train.lr")
    assert (lr["type"], lr["default"], lr["exclusiveMinimum"], lr["maximum"]) == ("number", 0.0002, 0, 1)
    assert resolve(schema, "train.lr")["description"] == "Peak learning rate (AdamW)."
    both = runner.invoke(main, ["schema", "--json", "--markdown"])
    assert both.exit_code == 2 and "not both" in both.output


def resolve(schema: dict[str, Any], key: str) -> dict[str, Any]:
    """The schema of a dotted key, through $ref and optional (anyOf [..., null]) sections."""
    node = schema
    for part in key.split("."):
        node = _section(schema, node)["properties"][part]
    return node


def _section(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    for option in [node, *node.get("anyOf", [])]:
        if "$ref" in option:
            return schema["definitions"][option["$ref"].rsplit("/", 1)[-1]]
        if "properties" in option:
            return option
    raise KeyError(node)


def test_json_schema_validates_the_shipped_job_files():
    jsonschema = pytest.importorskip("jsonschema")
    schema = schema_doc.json_schema()
    validator = jsonschema.Draft7Validator(schema)
    jsonschema.Draft7Validator.check_schema(schema)
    assert len(EXAMPLES) >= 6
    for path in EXAMPLES:
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, (path.name, errors)
    bad = {"model": "m", "data": {"train": "t.parquet"}, "lora": {"rnak": 8}, "train": {"epochs": 0}, "method": "sft",
           "tune": {"space": {"train.lr": {"uniform": [1e-4]}}}}
    wrong = {".".join(map(str, e.absolute_path)) for e in validator.iter_errors(bad)}
    assert wrong == {"lora", "train.epochs", "method", "tune"}, wrong
    deepest = jsonschema.exceptions.best_match(validator.iter_errors({**bad, "lora": {}, "train": {}, "method": "lora"}))
    assert list(deepest.absolute_path) == ["tune", "space", "train.lr", "uniform"]
