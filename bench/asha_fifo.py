"""ASHA against FIFO on the same search: same space, seed, num_samples and trial budget.

    scripts/netns.sh .venv/bin/python bench/asha_fifo.py [QUICKSTART_DIR] [--samples 6]

Runs examples/tune.yaml twice through `rayft tune` (scheduler: asha, then fifo) on the quickstart's
material, over the same grid of learning rates, one trial at a time; reports total trial-steps (the
compute spent), the best eval accuracy, and wall time.
Results: bench/results/asha_fifo.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
GRID = [5e-3, 7e-3, 3e-4, 5e-4, 2e-3, 1e-3]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("quickstart", nargs="?", default=str(REPO / "quickstart"))
    ap.add_argument("--samples", type=int, default=6)
    args = ap.parse_args()
    root = Path(args.quickstart).resolve()
    work = Path(tempfile.mkdtemp(prefix="rayft-asha-fifo-"))
    rows = {}
    for scheduler in ("asha", "fifo"):
        body = yaml.safe_load((REPO / "examples" / "tune.yaml").read_text())
        body["model"] = str(root / "base")
        body["data"].update(train=str(root / "data/french_train.parquet"), eval=str(root / "data/french_eval.parquet"))
        body["output"] = str(work / scheduler)
        # One trial at a time over a fixed grid: both schedulers see the same trials in the same order,
        # so the comparison does not depend on which trial reaches an ASHA milestone first.
        body["tune"].update(scheduler=scheduler, num_samples=1, max_concurrent=1, space={"train.lr": {"grid": GRID[: args.samples]}})
        path = work / f"{scheduler}.yaml"
        path.write_text(yaml.safe_dump(body))
        t0 = time.time()
        proc = subprocess.run([str(Path(sys.executable).parent / "rayft"), "tune", str(path), "--json"], capture_output=True, text=True, check=True)
        summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
        rows[scheduler] = {
            "trial_steps": summary["trial_steps"],
            "best_eval_accuracy": summary["best"]["best_metric"],
            "stopped_early": sum(t["status"] == "stopped early" for t in summary["trials"]),
            "trials": len(summary["trials"]),
            "wall_s": round(time.time() - t0, 1),
        }
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "asha_fifo.json").write_text(json.dumps({"samples": args.samples, "schedulers": rows}, indent=2))
    print("| scheduler | trials | stopped early | trial-steps | best eval accuracy | wall s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['trials']} | {r['stopped_early']} | {r['trial_steps']} | {r['best_eval_accuracy']:.3f} | {r['wall_s']} |")
    a, f = rows["asha"], rows["fifo"]
    print(f"\nASHA used {a['trial_steps'] / f['trial_steps']:.2f}x FIFO's trial-steps and {a['wall_s'] / f['wall_s']:.2f}x its wall time")


if __name__ == "__main__":
    main()
