"""The tune: section: what `rayft tune` searches (a Dimension per dotted key), how it picks points and
stops trials, and what it may spend (BudgetConfig)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.config.sections import Section, number_as_text, parse_duration, parse_size


class Dimension(Section):
    """One searched key: exactly one of choice, uniform, loguniform, grid."""

    choice: list[Any] | None = None
    """Values to pick from: random and optuna sample among them; search: grid takes each once."""
    uniform: tuple[float, float] | None = None
    """[low, high]: a number drawn uniformly between the bounds (random and optuna; not search: grid)."""
    loguniform: tuple[float, float] | None = None
    """[low, high], both above 0: a number drawn uniformly in log space, e.g. a learning rate (random and optuna)."""
    grid: list[Any] | None = None
    """Values each run once: every combination with the other grid (and, for search: grid, choice) keys; not with optuna."""

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [k for k in ("choice", "uniform", "loguniform", "grid") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of choice, uniform, loguniform, grid (got {given or 'none'})")
        bounds = self.uniform or self.loguniform
        if bounds and not bounds[0] < bounds[1]:
            raise ValueError("bounds must be [low, high] with low < high")
        if self.loguniform and self.loguniform[0] <= 0:
            raise ValueError("loguniform bounds must be positive")
        return self

    def values_to_check(self) -> list[Any]:
        """Values that must each make a valid job (every choice/grid value, both bounds)."""
        return list(self.choice or self.grid or self.uniform or self.loguniform or [])


class BudgetConfig(Section):
    """What a search may spend; it starts no trial that would take it past either limit."""

    trial_steps: int | None = Field(None, ge=1)
    """Optimizer steps summed over every trial (a trial's steps are reserved when it starts and released when
    an early stop ends it); a trial that would not fit is not started, and the search ends when nothing runs."""
    wall: str | None = None
    """Wall time of the whole search, e.g. 2h, 90m, 1h30m (--resume counts earlier invocations' time): no trial
    starts that the trials so far predict would end past it, and at the limit the running trials are stopped at
    their next report (their best checkpoints stay exportable)."""

    _wall_text = field_validator("wall", mode="before")(number_as_text)

    @field_validator("wall")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @model_validator(mode="after")
    def _something(self) -> BudgetConfig:
        if self.trial_steps is None and self.wall is None:
            raise ValueError("give trial_steps, wall or both (or drop tune.budget)")
        return self

    @property
    def wall_s(self) -> float | None:
        return None if self.wall is None else parse_duration(self.wall)


class TuneConfig(Section):
    metric: Literal["eval_accuracy", "eval_loss", "eval_generated_accuracy"] = "eval_accuracy"
    """What picks the best trial (reported at every eval; eval_generated_accuracy needs eval.generate)."""
    mode: Literal["max", "min"] | None = None
    """max or min; null = max for the accuracies, min for eval_loss."""
    search: Literal["random", "grid", "optuna"] = "random"
    """How points are chosen. random: choice/uniform/loguniform sampled (grid keys enumerated, num_samples
    draws for each grid point); grid: every combination of the grid and choice values once, in an order
    shuffled by tune.seed (no ranges);
    optuna: Optuna's TPE sampler (pip install 'rayft[optuna]'), which proposes each point from the trials that
    finished (choice and ranges; no grid)."""
    num_samples: int | None = Field(None, ge=1)
    """Points to draw (random, optuna; for random each grid point gets this many); null = 8, 1 when the space
    is only grid keys, or as many as tune.budget allows when a budget is set; a random search over choice
    keys only draws distinct points (null: at most all of them) before it repeats one. Ignored by search: grid."""
    repeats: int = Field(1, ge=1)
    """Runs of each point, each with its own train.seed (train.seed, +1, ...), shown as a train.seed column in
    the results; grid and random only."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha stops trials whose metric trails at a milestone; fifo runs every trial to completion."""
    grace_share: float = Field(0.625, gt=0, lt=1)
    """ASHA: no trial is stopped before this share of its optimizer steps (rounded up to an eval); that step is
    the first milestone, and each later one is reduction_factor times further, up to the run's end."""
    grace_evals: int | None = Field(None, ge=1)
    """ASHA: put the first milestone at this many evals instead (overrides grace_share)."""
    reduction_factor: int = Field(3, ge=2)
    """ASHA: at each milestone a trial goes on only if its metric is not below the (1 - 1/reduction_factor)
    quantile of the trials that reached that milestone before it (ties go on)."""
    budget: BudgetConfig | None = None
    """Limits on what the search spends: trial_steps, wall (see tune.budget.*)."""
    memory_budget: str | None = None
    """Memory per GPU (or per CPU worker) the trials must fit, e.g. 16GiB: a trial the planner predicts above it is
    skipped before its workers start, and the best that fits is exported; null = what the machine has
    (--memory-limit overrides it)."""
    max_concurrent: int | None = Field(None, ge=1)
    """Trials at once; null = as many as the machine's CPUs (or GPUs) fit, given each trial's workers."""
    seed: int = 0
    """Seed of the random and optuna samplers."""
    max_failures: int = Field(1, ge=-1)
    """Per trial: times its workers are restarted from the trial's latest checkpoint after one is lost; a
    trial whose failures are used up is recorded as failed with its reason, and the search goes on."""
    space: dict[str, Dimension] = {}
    """Dotted job keys to search, e.g. lora.rank: {choice: [8, 16]}, train.lr: {loguniform: [1e-5, 1e-3]}."""

    _memory_text = field_validator("memory_budget", mode="before")(number_as_text)

    @field_validator("memory_budget")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)
        return value

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric == "eval_loss" else "max")

    @property
    def samples(self) -> int:
        """Ray Tune's num_samples for this search (the trials, times each grid point's repeats)."""
        points = self.discrete_points()
        if self.search == "grid":
            return points or 1  # each point once
        if self.num_samples is not None:
            return self.num_samples
        if all(d.grid is not None for d in self.space.values()):
            return 1  # a grid's points once each (repeats, if asked, each with its own seed)
        if points is not None:  # every point once at most: a repeat of a point with the same seed is the same run
            return points if self.budget is not None else min(8, points)
        return -1 if self.budget is not None else 8  # -1: Tune draws until the budget ends the search

    def discrete_points(self) -> int | None:
        """How many distinct points the search enumerates, each once (a grid; a random search over choice keys
        only), else None."""
        if not self.space or self.search == "optuna" or (self.search == "random" and any(d.choice is None for d in self.space.values())):
            return None
        return math.prod(len(d.choice or d.grid or []) for d in self.space.values())
