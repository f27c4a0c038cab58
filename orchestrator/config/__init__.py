"""The job schema and its loading: one typed, frozen object; every default lives in the schema, each field
has a one-line doc.

`load_job` is the edge: YAML + `--set` overrides -> schema -> cross-field and filesystem checks, with
every problem collected and raised at once as a ConfigError. Workers rebuild the same object from
`job.model_dump()` with `JobConfig.model_validate`. Which file holds what, each importing only the ones
above it:

  sections.py  the job file's sections (data, lora, quantization, train, deepspeed, scaling, submit, export,
               eval, tracking), each field with its default and doc; sizes and durations (parse_size)
  tune.py      the tune: section: searched dimensions, search and scheduler settings, budget
  job.py       JobConfig: the whole job file
  problems.py  Problem, ConfigError, and pydantic's errors said in the job file's words (bounds_text, ...)
  checks.py    cross-field, architecture and filesystem checks (check_job); GPU presence (uses_gpu)
  load.py      YAML + --set overrides -> a checked job (load_job, build_job), a search (load_search), to_yaml

This module re-exports every public name of the parts, so callers import from `orchestrator.config`.
"""

from orchestrator.config.checks import check_job, gpu_present, uses_gpu
from orchestrator.config.job import JobConfig
from orchestrator.config.load import (
    apply_overrides,
    build_job,
    load_job,
    load_raw,
    load_search,
    parse_set,
    to_yaml,
)
from orchestrator.config.problems import ConfigError, Problem, bounds, bounds_text, number_text
from orchestrator.config.sections import (
    DATA_SUFFIXES,
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    LoraConfig,
    Method,
    MlflowConfig,
    Precision,
    QuantizationConfig,
    QuantType,
    ScalingConfig,
    SubmitConfig,
    TrackingConfig,
    TrainConfig,
    WandbConfig,
    parse_duration,
    parse_size,
)
from orchestrator.config.tune import BudgetConfig, Dimension, TuneConfig

__all__ = [
    "DATA_SUFFIXES",
    "BudgetConfig",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "Dimension",
    "EvalConfig",
    "ExportConfig",
    "GenerateConfig",
    "JobConfig",
    "LoraConfig",
    "Method",
    "MlflowConfig",
    "Precision",
    "Problem",
    "QuantType",
    "QuantizationConfig",
    "ScalingConfig",
    "SubmitConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "WandbConfig",
    "apply_overrides",
    "bounds",
    "bounds_text",
    "build_job",
    "check_job",
    "gpu_present",
    "load_job",
    "load_raw",
    "load_search",
    "number_text",
    "parse_duration",
    "parse_set",
    "parse_size",
    "to_yaml",
    "uses_gpu",
]
