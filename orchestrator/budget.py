"""tune.budget: what a search may spend in trial-steps and wall time, kept in SEARCH_DIR/budget.json.

A trial's steps are reserved when it starts (its planned length) and released down to what it ran when it
ends, so an early stop frees budget for the next trial. `BudgetedSearch` wraps the search algorithm Tune
was given (random/grid or Optuna) and starts a trial only if spent + reserved + its steps fit trial_steps
and, from the seconds per step of the trials so far, it would end before `wall`; otherwise it holds the
trial until a running one ends, and ends the search (the trial never starts) when nothing runs. `BudgetStopper`
stops the running trials at their next report once the wall time is spent. The ledger lives in a file, not
in these objects, because Tune pickles both into its experiment state and a --resume rebuilds them.

This module imports Ray Tune at import time: only `orchestrator.search.run` imports it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.tune.search import SearchAlgorithm
from ray.tune.stopper import Stopper

LEDGER = "budget.json"
# keys whose value changes how many optimizer steps a trial runs
LENGTH_KEYS = ("train.epochs", "train.max_steps", "train.micro_batch_size", "train.grad_accum", "scaling.workers",
               "data.batching", "data.batch_tokens")


@dataclass
class Ledger:
    trial_steps: int | None
    wall_s: float | None
    wall_before_s: float = 0.0
    """Wall time of the search's earlier invocations (an interrupted one, before its --resume)."""
    started: float = field(default_factory=time.time)
    trials: dict[str, dict[str, Any]] = field(default_factory=dict)
    """trial id -> {cost (steps reserved), reached, done, first, last (times of its first and last report)}."""
    not_started: int = 0
    ended: str | None = None
    wall_stopped: list[str] = field(default_factory=list)
    wall_spent_s: float = 0.0
    """The search's wall time when the ledger was last written."""

    @classmethod
    def load(cls, search_dir: Path) -> Ledger:
        return cls(**json.loads((search_dir / LEDGER).read_text()))

    def save(self, search_dir: Path) -> None:
        self.wall_spent_s = round(self.wall_spent(), 1)
        tmp = search_dir / (LEDGER + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.replace(search_dir / LEDGER)

    def spent_steps(self) -> int:
        return sum(t["reached"] for t in self.trials.values())

    def reserved_steps(self) -> int:
        return sum(max(0, t["cost"] - t["reached"]) for t in self.trials.values() if not t["done"])

    def wall_spent(self, now: float | None = None) -> float:
        return self.wall_before_s + ((now or time.time()) - self.started)

    def running(self) -> bool:
        return any(not t["done"] for t in self.trials.values())

    def seconds_per_step(self) -> float | None:
        rates = sorted((t["last"] - t["first"]) / t["reached"] for t in self.trials.values() if t.get("first") and t["reached"] > 0)
        return rates[len(rates) // 2] if rates else None

    def refusal(self, cost: int, now: float | None = None) -> str | None:
        """Why a trial of `cost` steps may not start now, or None."""
        if self.trial_steps is not None and self.spent_steps() + self.reserved_steps() + cost > self.trial_steps:
            return (f"tune.budget.trial_steps: {self.spent_steps()} spent + {self.reserved_steps()} reserved by running trials "
                    f"+ {cost} for the next trial > {self.trial_steps}")
        if self.wall_s is not None:
            rate = self.seconds_per_step()
            predicted = self.wall_spent(now) + (rate or 0.0) * cost
            if predicted > self.wall_s:
                return (f"tune.budget.wall: {self.wall_spent(now):.0f} s spent, the next trial predicted to end at "
                        f"{predicted:.0f} s > {self.wall_s:.0f} s")
        return None


def open_ledger(search_dir: Path, trial_steps: int | None, wall_s: float | None, wall_before_s: float) -> Ledger:
    """The search's ledger: a new one, or (--resume) the earlier one, restarted for this invocation."""
    if (search_dir / LEDGER).is_file():
        ledger = Ledger.load(search_dir)
        ledger.trial_steps, ledger.wall_s, ledger.ended = trial_steps, wall_s, None
        # Trials that were running when the search was interrupted may not come back (an errored one is not
        # resumed): none reserves steps until it reports again, so a stale entry cannot hold the search forever.
        for t in ledger.trials.values():
            t["done"] = True
    else:
        ledger = Ledger(trial_steps, wall_s)
    ledger.wall_before_s, ledger.started = wall_before_s, time.time()
    ledger.save(search_dir)
    return ledger


def trial_cost(config: dict[str, Any], costs: dict[str, int], default: int) -> int:
    """The steps a trial of `config` (dotted keys) will run: from the table of planned lengths by the
    length keys' values, or the base job's length."""
    return costs.get(length_key(config), default)


def length_key(config: dict[str, Any]) -> str:
    return json.dumps({k: config[k] for k in LENGTH_KEYS if k in config}, sort_keys=True, default=str)


class BudgetedSearch(SearchAlgorithm):
    """Tune's search algorithm `inner`, whose trials start only while the budget allows (see module doc)."""

    def __init__(self, inner: SearchAlgorithm, search_dir: str, costs: dict[str, int], default_cost: int) -> None:
        super().__init__()
        self.inner, self.search_dir, self.costs, self.default_cost = inner, search_dir, costs, default_cost
        self._held: Any = None
        self._done = False

    # -- what the budget adds ------------------------------------------------------------------------
    def next_trial(self) -> Any:
        if self._done:
            return None
        if self._held is None:
            self._held = self.inner.next_trial()
            if self._held is None:
                return None
        path = Path(self.search_dir)
        ledger = Ledger.load(path)
        cost = trial_cost(self._held.config, self.costs, self.default_cost)
        why = ledger.refusal(cost)
        if why is None:
            ledger.trials[self._held.trial_id] = {"cost": cost, "reached": 0, "done": False, "first": None, "last": None}
            ledger.save(path)
            trial, self._held = self._held, None
            return trial
        if not ledger.running():  # nothing will free budget: the search ends here
            ledger.ended, ledger.not_started = why, ledger.not_started + 1
            ledger.save(path)
            self._held, self._done = None, True
            self.inner.set_finished()
        return None

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.inner.on_trial_result(trial_id, result)
        path = Path(self.search_dir)
        ledger = Ledger.load(path)
        t = ledger.trials.get(trial_id)
        if t is not None and "step" in result:
            now = time.time()
            t["reached"] = max(t["reached"], int(result["step"]))
            t["cost"] = int(result.get("total_steps") or t["cost"])  # the trial's own plan replaces the estimate
            t["first"], t["last"] = t["first"] or now, now
            t["done"] = False  # a trial resumed by --resume reserves its remaining steps again
            ledger.save(path)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self.inner.on_trial_complete(trial_id, result=result, error=error)
        path = Path(self.search_dir)
        ledger = Ledger.load(path)
        if trial_id in ledger.trials:
            ledger.trials[trial_id]["done"] = True
            ledger.save(path)

    def is_finished(self) -> bool:
        return self._done or (self.inner.is_finished() and self._held is None)

    def set_finished(self) -> None:
        self._done = True
        self.inner.set_finished()

    # -- the rest is the inner algorithm's -----------------------------------------------------------
    @property
    def metric(self) -> Any:
        return self.inner.metric

    @property
    def total_samples(self) -> int:
        return self.inner.total_samples

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.inner.set_search_properties(metric, mode, config, **spec)

    def add_configurations(self, experiments: Any) -> None:
        self.inner.add_configurations(experiments)

    def has_checkpoint(self, dirpath: str) -> bool:
        return self.inner.has_checkpoint(dirpath)

    def save_to_dir(self, dirpath: str, **kwargs: Any) -> None:
        self.inner.save_to_dir(dirpath, **kwargs)

    def restore_from_dir(self, dirpath: str) -> None:
        self.inner.restore_from_dir(dirpath)


class BudgetStopper(Stopper):
    """At tune.budget.wall, every running trial is stopped at its next report; a trial whose steps would take
    the search past tune.budget.trial_steps (its length was estimated low before it reported its plan) is
    stopped when the sum reaches it. Both are recorded in the ledger."""

    def __init__(self, search_dir: str) -> None:
        self.search_dir = search_dir

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        path = Path(self.search_dir)
        ledger = Ledger.load(path)
        if ledger.trial_steps is None or trial_id not in ledger.trials or "step" not in result:
            return False
        others = sum(t["reached"] for tid, t in ledger.trials.items() if tid != trial_id)
        if others + int(result["step"]) < ledger.trial_steps or int(result["step"]) >= int(result.get("total_steps") or 0):
            return False
        ledger.ended = f"tune.budget.trial_steps: {ledger.trial_steps} steps spent; trial {trial_id} stopped there"
        ledger.save(path)
        return True

    def stop_all(self) -> bool:
        path = Path(self.search_dir)
        ledger = Ledger.load(path)
        if ledger.wall_s is None or ledger.wall_spent() < ledger.wall_s:
            return False
        if ledger.ended is None or not ledger.ended.startswith("tune.budget.wall"):
            ledger.ended = f"tune.budget.wall: {ledger.wall_spent():.0f} s spent >= {ledger.wall_s:.0f} s; running trials stopped"
            ledger.wall_stopped = [tid for tid, t in ledger.trials.items() if not t["done"]]
            ledger.save(path)
        return True
