"""Submit latency and end-to-end wall time of the quickstart's QLoRA job on a local two-node cluster.

    scripts/netns.sh .venv/bin/python bench/cluster_submit.py [QUICKSTART_DIR] [--rounds 2]

`rayft cluster up --nodes 2` (loopback, token auth), then per round: `rayft submit` (returns once the
job has checked its inputs on the cluster: submit-to-running), then `rayft logs --follow` until the job
ends (end-to-end), then compares with `rayft train` of the same job on an embedded local Ray.
Results: bench/results/cluster_submit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, alternate, ratio, write_result  # noqa: E402

RAYFT = str(Path(sys.executable).with_name("rayft"))
ADDRESS = "http://127.0.0.1:8276"


def run(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([RAYFT, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise RuntimeError(f"rayft {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("quickstart", nargs="?", default=str(REPO / "quickstart"))
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    root = Path(args.quickstart).resolve()
    work = Path(tempfile.mkdtemp(prefix="rayft-cluster-bench-"))
    body = yaml.safe_load((REPO / "examples" / "qlora-nf4.yaml").read_text())
    body["model"] = str(root / "base")
    body["data"].update(train=str(root / "data/french_train.parquet"), eval=str(root / "data/french_eval.parquet"))
    body["output"] = str(work / "local-runs")
    body["scaling"] = {"workers": 1, "cpus_per_worker": 1}
    body["submit"] = {"storage_path": str(work / "storage"), "ship": ["model", "data"]}
    job = work / "job.yaml"
    job.write_text(yaml.safe_dump(body))

    t0 = time.time()
    run("cluster", "up", "--dir", str(work / "cluster"), "--nodes", "2", "--cpus-per-node", "1", "--port", "6392", "--dashboard-port", "8276")
    up_s = time.time() - t0
    env = {"RAY_AUTH_TOKEN_PATH": str(work / "cluster" / "auth_token")}

    def submitted() -> dict[str, float]:
        t = time.time()
        out = json.loads(run("submit", str(job), "--address", ADDRESS, "--json", env=env).stdout)
        run("logs", out["job_id"], "--follow", "--address", ADDRESS, env=env)
        status = json.loads(run("status", out["job_id"], "--address", ADDRESS, "--json", env=env).stdout)["status"]
        if status != "SUCCEEDED":
            raise RuntimeError(f"{out['job_id']}: {status}")
        return {"submit_s": out["submit_s"], "submit_to_running_s": out["submit_to_running_s"], "end_to_end_s": time.time() - t}

    def local() -> dict[str, float]:
        t = time.time()
        run("train", str(job), "--no-progress", "--json")
        return {"end_to_end_s": time.time() - t}

    try:
        rows = alternate({"submit (2-node cluster)": submitted, "rayft train (embedded Ray)": local}, rounds=args.rounds)
    finally:
        run("cluster", "down", "--dir", str(work / "cluster"))
    sub, loc = rows["submit (2-node cluster)"]["median"], rows["rayft train (embedded Ray)"]["median"]
    summary = [
        {"benchmark": "cluster submission", "measure": "submit -> inputs checked on the cluster, s", "rayft": round(sub["submit_to_running_s"], 1),
         "baseline": None, "ratio": None, "note": f"2-node loopback cluster (up in {up_s:.0f} s), quickstart QLoRA job"},
        {"benchmark": "cluster submission", "measure": "end-to-end wall, s (submit vs local rayft train)", "rayft": round(sub["end_to_end_s"], 1),
         "baseline": round(loc["end_to_end_s"], 1), "ratio": ratio(sub["end_to_end_s"], loc["end_to_end_s"]), "note": "same job, same 2 cores"},
    ]
    write_result("cluster_submit", {"cluster_up_s": round(up_s, 1), "contenders": rows}, summary)
    print(f"cluster up: {up_s:.1f}s")
    print("| path | submit -> running s | end-to-end s |")
    print("|---|---|---|")
    print(f"| rayft submit (2-node loopback cluster) | {sub['submit_to_running_s']:.1f} | {sub['end_to_end_s']:.1f} |")
    print(f"| rayft train (embedded Ray) | - | {loc['end_to_end_s']:.1f} |")


if __name__ == "__main__":
    main()
