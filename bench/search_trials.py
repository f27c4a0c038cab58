"""What a search pays per trial: `rayft tune` of examples/tune.yaml's QLoRA search on the quickstart task, one
trial at a time (fifo, 4 learning rates, 16 steps each), this tree against an earlier commit REV (run from a git
worktree, as bench/overhead.py --before does); alternated, medians.

    scripts/netns.sh .venv/bin/python bench/search_trials.py [QUICKSTART_DIR] --before REV [--rounds 2] [--trials 4]

Per trial, from its metrics.jsonl: the actor's start -> model loaded (imports, 4-bit base, adapters), and the time
from the previous trial's last record to this one's first optimizer step (what the search spends between trials).
Results: bench/results/search_trials.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, alternate, write_result

RAYFT = str(Path(sys.executable).parent / "rayft")


def search_job(quickstart: Path, out: Path, trials: int, steps: int) -> Path:
    import yaml

    body = yaml.safe_load((REPO / "examples" / "tune.yaml").read_text())
    root = quickstart.resolve()
    body["model"] = str(root / "base")
    body["data"].update(train=str(root / "data/french_train.parquet"), eval=str(root / "data/french_eval.parquet"))
    body["train"]["max_steps"] = steps
    lrs = [5e-3, 7e-3, 3e-3, 1e-2, 2e-3, 4e-3, 6e-3, 8e-3][:trials]
    body["tune"].update(num_samples=1, scheduler="fifo", max_concurrent=1, space={"train.lr": {"grid": lrs}})
    path = out / "search.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def rayft_tune(job_file: Path, out: Path, code: Path | None = None) -> dict[str, float]:
    """One `rayft tune` subprocess into `out`; its wall and the spans of its trials."""
    env = {**os.environ, "PYTHONPATH": str(code)} if code else None
    t0 = time.time()
    proc = subprocess.run([RAYFT, "tune", str(job_file), "--json", "--set", f"output={out}"], capture_output=True, text=True, env=env, cwd=code)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"rayft tune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    trials_dir = Path(summary["best_model"]).parents[1] / "trials"
    spans = []
    for t in trials_dir.iterdir():
        records = [json.loads(x) for x in (t / "metrics.jsonl").read_text().splitlines()]
        start = next(r for r in records if r.get("event") == "start")
        first = next(r for r in records if r.get("event") == "first_step")
        spans.append({"created": (t / "job.yaml").stat().st_mtime, "model_s": start["clock"]["model_loaded"] - start["clock"]["worker_started"],
                      "first_step": first["time"], "end": records[-1]["time"], "steps_s": sum(r.get("step_s", 0) for r in records if r.get("event") == "first_step")})
    spans.sort(key=lambda s: s["created"])
    between = [b["first_step"] - a["end"] for a, b in zip(spans, spans[1:], strict=False)]
    return {
        "cli_wall_s": wall,
        "search_wall_s": summary["wall_s"],
        "trials": len(spans),
        "first_trial_model_s": spans[0]["model_s"],
        "later_trials_model_s": statistics.median(s["model_s"] for s in spans[1:]) if len(spans) > 1 else float("nan"),
        "between_trials_s": statistics.median(between) if between else float("nan"),
        "trials_span_s": spans[-1]["end"] - spans[0]["created"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("quickstart", nargs="?", default=str(REPO / "quickstart"))
    parser.add_argument("--before", required=True, help="the earlier commit to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="rayft-search-trials-"))
    old = out / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), args.before], check=True, capture_output=True)
    try:
        job_file = search_job(Path(args.quickstart), out, args.trials, args.steps)
        rows = alternate(
            {"before": lambda: rayft_tune(job_file, Path(tempfile.mkdtemp(dir=out)), code=old),
             "after": lambda: rayft_tune(job_file, Path(tempfile.mkdtemp(dir=out)))},
            rounds=args.rounds,
        )
        b, a = rows["before"]["median"], rows["after"]["median"]
        print(f"\n{args.trials} trials of {args.steps} steps, one at a time; medians of {args.rounds}, seconds")
        print(f"{'':<24} {'before':>8} {'after':>8}  ratio")
        for key in ("cli_wall_s", "search_wall_s", "trials_span_s", "first_trial_model_s", "later_trials_model_s", "between_trials_s"):
            print(f"{key:<24} {b[key]:>8.2f} {a[key]:>8.2f}  {a[key] / b[key]:.2f}")
        summary = [{"benchmark": f"rayft tune: {args.trials} one-worker QLoRA trials of {args.steps} steps, one at a time", "measure": "search wall (s)",
                    "rayft": round(a["search_wall_s"], 1), "baseline": round(b["search_wall_s"], 1), "ratio": round(a["search_wall_s"] / b["search_wall_s"], 2),
                    "note": f"baseline: {args.before} (a TorchTrainer per trial); trials after the first: model built in {a['later_trials_model_s']:.1f} s (was {b['later_trials_model_s']:.1f})"}]
        write_result("search_trials", {"before": args.before, "trials": args.trials, "steps": args.steps, **rows}, summary)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)


if __name__ == "__main__":
    main()
