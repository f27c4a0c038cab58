"""Dotted keys ("train.lr", "zero_optimization.stage") over nested dicts: the one reader and writer behind
--set, Tune trial overrides, deepspeed.overrides, the cluster package's path rewrites, and the flat views
trackers and the planner compare."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def get(tree: Any, dotted: str) -> Any:
    """The value at dotted in tree, or None where a part is missing."""
    for key in dotted.split("."):
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def set_in(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set dotted in tree in place, making (or replacing with) a dict at each missing or non-dict parent."""
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = value
