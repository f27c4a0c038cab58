"""Loading a job: YAML (load_raw, with relative paths resolved against the file) + `--set` overrides
(parse_set, apply_overrides: the same function serves Tune trials) -> schema -> checks, every problem
raised at once as a ConfigError (build_job, load_job); a search's job and every value its space can take
(load_search); the resolved job back as YAML (to_yaml)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from orchestrator import dotted
from orchestrator.config.checks import check_job
from orchestrator.config.job import JobConfig
from orchestrator.config.problems import ConfigError, Problem, pydantic_problems
from orchestrator.config.tune import Dimension, TuneConfig


class _Yaml12Loader(yaml.SafeLoader):
    """yaml.SafeLoader with YAML 1.2's booleans: only true/false. YAML 1.1's on/off/yes/no stay strings, so that
    `gpu: off` and `--set data.encode_once=off` mean the option's value "off", not False."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def yaml_load(text: str) -> Any:
    """A job file's (or a --set value's) YAML, with YAML 1.2 booleans (_Yaml12Loader)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader)


def parse_set(item: str) -> tuple[str, Any]:
    """`a.b=value` -> ("a.b", value parsed as YAML, so numbers, booleans and lists keep their types)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError([Problem(item, "an override must look like key.path=value", "e.g. --set train.lr=1e-4")])
    return key.strip(), yaml_load(value) if value.strip() else ""


def apply_overrides(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of `raw` with dotted keys set. The same function serves `--set` and Tune trials."""
    out: dict[str, Any] = json.loads(json.dumps(raw))
    for key, value in overrides.items():
        dotted.set_in(out, key, value)
    return out


_PATH_KEYS = (("model",), ("data", "train"), ("data", "eval"), ("output",), ("submit", "storage_path"))


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths in a job file resolve against the file's directory, so a job runs from any cwd."""
    out = json.loads(json.dumps(raw))
    for keys in _PATH_KEYS:
        node = out
        for k in keys[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(keys[-1]), str):
            continue
        value = os.path.expanduser(node[keys[-1]])
        candidate = base / value
        is_hub_id = keys == ("model",) and not value.startswith((".", "/")) and not candidate.exists()
        if not os.path.isabs(value) and not is_hub_id and "://" not in value:
            node[keys[-1]] = str(candidate.resolve())
    return out


def _without(raw: Mapping[str, Any], locs: Iterable[tuple[Any, ...]]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(json.dumps(raw))
    for loc in locs:
        node: Any = out
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return out


def load_raw(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError([Problem(str(path), "job file not found", "check the path")])
    try:
        raw = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([Problem(str(path), f"not valid YAML: {e}", "fix the YAML syntax")]) from None
    if not isinstance(raw, dict):
        raise ConfigError([Problem(str(path), "a job file must be a mapping of keys", "see `rayft validate --help`")])
    return _resolve_paths(raw, path.parent.resolve())


def build_job(raw: Mapping[str, Any], sets: Iterable[str] = (), *, local_files: bool = True, cluster: bool = False) -> tuple[JobConfig, list[str]]:
    """Raw mapping + `--set` items -> validated JobConfig and warnings; raises ConfigError with every problem.
    cluster: the job runs on a Ray cluster (check_job leaves GPU presence to the cluster)."""
    problems: list[Problem] = []
    overrides: dict[str, Any] = {}
    for item in sets:
        try:
            key, value = parse_set(item)
        except ConfigError as e:
            problems.extend(e.problems)
            continue
        overrides[key] = value
    raw = apply_overrides(raw, overrides)
    raw = _resolve_paths(raw, Path.cwd()) if overrides else raw
    try:
        job = JobConfig.model_validate(raw)
    except ValidationError as e:
        # Report the schema's problems and, so that every problem shows at once, the cross-field and
        # filesystem problems of what remains once the bad keys fall back to their defaults.
        problems.extend(pydantic_problems(e))
        reported = {p.path for p in problems}
        try:
            partial = JobConfig.model_validate(_without(raw, [err["loc"] for err in e.errors()]))
        except ValidationError:
            raise ConfigError(problems) from None
        problems.extend(p for p in check_job(partial, local_files=local_files, cluster=cluster)[0] if p.path not in reported)
        raise ConfigError(problems) from None
    if local_files:
        job, hub_problem = resolve_model(job)
        if hub_problem:  # nothing else about the model can be checked
            problems.append(hub_problem)
            problems.extend(p for p in check_job(job.model_copy(update={"model": "."}), local_files=local_files, cluster=cluster)[0] if p.path != "model")
            raise ConfigError(problems)
    found, warnings = check_job(job, local_files=local_files, cluster=cluster)
    problems.extend(found)
    if problems:
        raise ConfigError(problems)
    return job, warnings


def resolve_model(job: JobConfig) -> tuple[JobConfig, Problem | None]:
    """A hub id's model_revision resolved to its commit (its files in this machine's cache), which the job
    carries from here on: every node loads that commit. A local directory is left as it is."""
    from orchestrator import hub

    if not hub.is_hub_id(job.model):
        return job, None
    try:
        commit = hub.resolve(job.model, job.model_revision)
    except hub.HubError as e:
        return job, Problem(e.key, str(e), e.fix)
    return job.model_copy(update={"model_revision": commit}), None


def load_job(path: str | Path, sets: Iterable[str] = (), *, local_files: bool = True, cluster: bool = False) -> tuple[JobConfig, list[str]]:
    return build_job(load_raw(path), sets, local_files=local_files, cluster=cluster)


def load_search(path: str | Path, sets: Iterable[str] = ()) -> tuple[JobConfig, dict[str, Any], list[str]]:
    """A job with a `tune:` section: (job, the raw job trials start from, warnings). Every value the space
    can take is applied with the same function as --set and validated, so a key or value the job schema
    would refuse fails here, naming the key, before anything starts. Every problem is reported at once."""
    raw = load_raw(path)
    raw = _resolve_paths(apply_overrides(raw, dict(parse_set(item) for item in sets)), Path.cwd())
    # Trials start from what the user wrote (not the resolved dump), so schema defaults that follow other
    # keys (quantization follows method) still follow a searched key.
    base = {k: v for k, v in raw.items() if k != "tune"}
    problems: list[Problem] = []
    tune_raw = raw.get("tune")
    if not isinstance(tune_raw, Mapping):
        problems.append(Problem("tune", "the job has no tune: section", "add tune: {space: {...}} (see README)"))
        tune_raw = {}
    space_raw = tune_raw.get("space") or {}
    if not space_raw:
        problems.append(Problem("tune.space", "empty search space", "add at least one dotted key, e.g. lora.rank: {choice: [8, 16]}"))
    try:
        TuneConfig.model_validate({**tune_raw, "space": {}})
    except ValidationError as e:
        problems.extend(Problem(f"tune.{p.path}", p.message, p.fix) for p in pydantic_problems(e))
    try:
        build_job(base)
    except ConfigError as e:
        problems.extend(e.problems)
    for key, dim_raw in space_raw.items():
        try:
            dim = Dimension.model_validate(dim_raw)
        except ValidationError as e:
            problems.extend(Problem(f"tune.space.{key}", p.message.removeprefix("Value error, "), p.fix) for p in pydantic_problems(e))
            continue
        if key.split(".")[0] in ("tune", "name", "output"):
            problems.append(Problem(f"tune.space.{key}", "cannot be searched", "search model, data, method, lora, quantization, precision, train or scaling keys"))
            continue
        for value in dim.values_to_check():
            try:
                build_job(apply_overrides(base, {key: value}))
            except ConfigError as e:
                for p in e.problems:
                    prefix = f"value {value!r}: " if p.path == key else f"value {value!r}: {p.path}: "
                    problems.append(Problem(f"tune.space.{key}", prefix + p.message, p.fix))
    problems.extend(_search_problems(tune_raw, space_raw))
    if problems:
        raise ConfigError(problems)
    job, warnings = build_job(raw)
    if job.model_revision is not None and job.model_revision != base.get("model_revision"):
        base = {**base, "model_revision": job.model_revision}  # a hub model's commit: every trial trains that one
    return job, base, warnings


def _search_problems(tune_raw: Mapping[str, Any], space_raw: Mapping[str, Any]) -> list[Problem]:
    """What tune.search, num_samples and repeats allow of the space's dimensions."""
    search, problems = tune_raw.get("search", "random"), []
    kinds = {k: next(iter(d)) for k, d in space_raw.items() if isinstance(d, Mapping) and len(d) == 1}
    if search == "grid":
        problems += [Problem(f"tune.space.{k}", f"search: grid needs listed values, not a {kind} range", "give grid: [...] or choice: [...], or use search: random or optuna")
                     for k, kind in kinds.items() if kind in ("uniform", "loguniform")]
    if search == "optuna":
        problems += [Problem(f"tune.space.{k}", "search: optuna does not enumerate grids", "give choice: [...] (Optuna picks among the values), or use search: grid")
                     for k, kind in kinds.items() if kind == "grid"]
    if search == "optuna" and importlib.util.find_spec("optuna") is None:
        problems.append(Problem("tune.search", "optuna is not installed", "pip install 'rayft[optuna]', or use search: random"))
    repeats = tune_raw.get("repeats", 1)
    if isinstance(repeats, int) and repeats > 1:
        if search == "optuna":
            problems.append(Problem("tune.repeats", "search: optuna proposes each point once", "use search: grid or random to repeat points"))
        if "train.seed" in space_raw:
            problems.append(Problem("tune.repeats", "repeats gives each run its own train.seed, and train.seed is also searched", "drop one of the two"))
    samples = tune_raw.get("num_samples")
    if search != "optuna" and kinds and all(kind == "grid" for kind in kinds.values()) and isinstance(samples, int) and samples > 1:
        problems.append(Problem("tune.num_samples", f"{samples} would run every grid point {samples} times with the same seed: the same weights, {samples} times over",
                                f"drop num_samples; to repeat each point with its own seed, set tune.repeats: {samples}"))
    return problems


def to_yaml(job: JobConfig) -> str:
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)
