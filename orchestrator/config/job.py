"""JobConfig: the whole job file, one typed, frozen object; every default lives in it or its sections.

Workers rebuild the same object from `job.model_dump()` with `JobConfig.model_validate`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field, model_validator

from orchestrator.config.sections import (
    DataConfig,
    DeepSpeedConfig,
    EvalConfig,
    ExportConfig,
    LoraConfig,
    Method,
    Precision,
    QuantizationConfig,
    ScalingConfig,
    Section,
    SubmitConfig,
    TrackingConfig,
    TrainConfig,
)
from orchestrator.config.tune import TuneConfig


class JobConfig(Section):
    name: str = Field("job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Run name: the run directory is <output>/<name>-<timestamp>."""
    model: str
    """Base model: a local Hugging Face directory, or a hub id (org/name) read through the Hugging Face cache."""
    model_revision: str | None = None
    """For a hub id: a branch, tag or commit (default: main). Validation resolves it to the commit, which every
    node then loads (recorded in the run's job.yaml and manifest)."""
    data: DataConfig
    """Where the rows are and which columns to read."""
    method: Method = "qlora"
    """full (every weight) | lora (adapters over a bf16/fp16/fp32 base) | qlora (adapters over a 4-bit base)."""
    lora: LoraConfig = LoraConfig()
    """Adapter shape (lora and qlora)."""
    quantization: QuantizationConfig = QuantizationConfig()
    """4-bit storage of the frozen base (qlora)."""
    precision: Precision = "bf16"
    """How the maths runs: bf16 | fp16 (with loss scaling) | fp32."""
    train: TrainConfig = TrainConfig()
    """Optimisation and cadence."""
    scaling: ScalingConfig = ScalingConfig()
    """Workers and devices."""
    deepspeed: DeepSpeedConfig | None = None
    """Shard training with DeepSpeed ZeRO (null: plain PyTorch data parallel)."""
    freeze: list[str] = []
    """What stays frozen in full fine-tuning: component names (vision, projector, language; see
    orchestrator/architectures.py) or module-name prefixes (e.g. model.vision_tower)."""
    tune: TuneConfig | None = None
    """The search `rayft tune` runs over this job (ignored by `rayft train`)."""
    output: str = "./runs"
    """Directory that receives run directories."""
    submit: SubmitConfig = SubmitConfig()
    """Running on a Ray cluster with `rayft submit` (ignored by `rayft train`)."""
    export: ExportConfig = ExportConfig()
    """The merged standalone model written at the end of a run (and by `rayft merge`)."""
    eval: EvalConfig = EvalConfig()
    """Generation-based evaluation, besides the teacher-forced metrics every eval reports."""
    tracking: TrackingConfig = TrackingConfig()
    """TensorBoard, MLflow and Weights & Biases tracking of every run and search."""

    @model_validator(mode="before")
    @classmethod
    def _quantization_follows_method(cls, raw: Any) -> Any:
        # The one default that depends on another field: a base is 4-bit only for qlora unless said otherwise.
        if isinstance(raw, Mapping) and raw.get("method", "qlora") != "qlora":
            quant = raw.get("quantization") or {}
            if isinstance(quant, Mapping) and "type" not in quant:
                raw = {**raw, "quantization": {**quant, "type": "none"}}
        return raw

    @property
    def model_dir(self) -> str:
        """Where the base model's files are on this node: `model` itself, or for a hub id the cache's snapshot
        of model_revision (downloaded into this node's cache the first time; orchestrator/hub.py)."""
        from orchestrator import hub

        return hub.local_dir(self.model, self.model_revision)

    @property
    def quantized(self) -> bool:
        return self.method == "qlora" and self.quantization.type != "none"
