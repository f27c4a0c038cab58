"""How a trial is named in the report: its hyperparameters, short (`lr=5e-3 r=16`), how it ended
(`best, stopped @8`), and the trials ranked by their best metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SHORT = {"train.lr": "lr", "lora.rank": "r", "lora.alpha": "alpha", "train.epochs": "ep", "precision": "precision",
         "method": "method", "quantization.type": "quant", "train.seed": "seed"}


def short_key(key: str) -> str:
    """train.lr -> lr, lora.rank -> r, ...; any other dotted key: its last part."""
    return SHORT.get(key, key.rsplit(".", 1)[-1])


def short_value(v: Any) -> str:
    """0.005 -> 5e-3, 0.000736 -> 7.36e-3, 0.05 -> 0.05, 32.0 -> 32, True -> true."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        if v != 0 and (abs(v) < 0.01 or abs(v) >= 1e5):
            mantissa, exponent = f"{v:.2e}".split("e")
            return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
        return f"{v:.3g}"
    return str(v)


def override_keys(trials: Sequence[dict[str, Any]]) -> list[str]:
    """Every searched key, in the order the trials list them."""
    keys: dict[str, None] = {}
    for t in trials:
        keys.update(dict.fromkeys(t["overrides"]))
    return list(keys)


def hp_label(overrides: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """A trial's hyperparameters, short: `lr=5e-3 r=16`."""
    parts = [f"{short_key(k)}={short_value(overrides[k])}" for k in (keys or list(overrides)) if k in overrides]
    return " ".join(parts) or "(base job)"


def trial_labels(trials: Sequence[dict[str, Any]]) -> dict[str, str]:
    """trial name -> its hyperparameter label; trials whose labels are the same (num_samples repeats a
    grid point) get their trial number appended: `lr=5e-3 #2`."""
    keys = override_keys(trials)
    labels = {t["trial"]: hp_label(t["overrides"], keys) for t in trials}
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    for i, t in enumerate(trials):
        if counts[labels[t["trial"]]] > 1:
            labels[t["trial"]] += f" #{_number(t['trial'], i)}"
    return labels


def group_label(group: Sequence[dict[str, Any]], keys: Sequence[str]) -> str:
    """One label for the trials drawn at one point: their distinct hyperparameters (three, then `+N`),
    and how many trials when more than one: `r=16 lr=5e-3 (4 trials)`."""
    distinct = list(dict.fromkeys(hp_label(t["overrides"], keys) for t in group))
    text = ", ".join(distinct[:3]) + (f" +{len(distinct) - 3}" if len(distinct) > 3 else "")
    return text + (f" ({len(group)} trials)" if len(group) > 1 else "")


def _number(trial: str, default: int) -> int:
    """Tune's trial number: tune_trial_71404_00003 -> 3."""
    tail = trial.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else default


def status_mark(t: dict[str, Any], best: str | None) -> str:
    """`best`, `stopped @8`, `best, stopped @8`, `skipped`, `failed`, or "" (finished)."""
    marks = ["best"] if t["trial"] == best else []
    if t["status"] == "stopped early":
        marks.append(f"stopped @{t['steps']}")
    elif t["status"] in ("skipped", "failed"):
        marks.append(t["status"])
    return ", ".join(marks)


def key_legend(trials: Sequence[dict[str, Any]]) -> str:
    """`lr = train.lr, r = lora.rank`: what the short names stand for."""
    return ", ".join(f"{short_key(k)} = {k}" for k in override_keys(trials) if short_key(k) != k)


def ranked(trials: Sequence[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best metric first (max or min); trials without one last, each group in trial order."""
    sign = -1 if mode == "max" else 1
    scored = sorted((t for t in trials if t["best_metric"] is not None), key=lambda t: sign * t["best_metric"])
    return scored + [t for t in trials if t["best_metric"] is None]
