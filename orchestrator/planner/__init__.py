"""Memory planner: bytes per GPU (or per CPU worker) for a job, predicted from config.json alone.

Pure Python on purpose (no torch, no transformers): `rayft plan` is instant and the fit check costs nothing
before `rayft train` / `rayft tune` launch. Which file holds what, each importing only the ones above it:

  shapes.py   config.json -> every parameter tensor, named as transformers names it, one section per
              architecture family; nominal sizes (`--model 7B`); the LoRA targets (load_shape, PlanError)
  memory.py   the memory model: bytes per term per worker, weights / gradients / optimizer / activations /
              overhead, under ZeRO and CPU offload (plan, Plan, four_bit_bytes)
  fit.py      budgets (Budget, budget_for: GPU memory, host MemAvailable), the fit check (check,
              DoesNotFit) and the cheapest change that fits (recommend; compare for `rayft plan`)
  render.py   `rayft plan`'s table (render)

This module re-exports one public entry per use, as `rayft plan`, the fit checks and the search call them.
"""

from orchestrator.planner.fit import (
    Budget,
    DoesNotFit,
    budget_for,
    check,
    compare,
    gpu_memory,
    host_available,
)
from orchestrator.planner.memory import Plan, four_bit_bytes, plan
from orchestrator.planner.render import render
from orchestrator.planner.shapes import PlanError, load_shape, lora_target_tensors, shape_from_config

__all__ = [
    "Budget",
    "DoesNotFit",
    "Plan",
    "PlanError",
    "budget_for",
    "check",
    "compare",
    "four_bit_bytes",
    "gpu_memory",
    "host_available",
    "load_shape",
    "lora_target_tensors",
    "plan",
    "render",
    "shape_from_config",
]
