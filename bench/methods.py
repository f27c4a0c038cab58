"""Steps/s and tokens/s of full, lora, qlora-nf4 and qlora-fp4 on the quickstart's tiny VLM, one Ray session.

    make quickstart && scripts/netns.sh .venv/bin/python bench/methods.py [QUICKSTART_DIR]

Each method trains the examples/ job (2 epochs, 64 steps, micro batch 16) through `launch.train`; the
rates are medians of the train loop's own windows (eval excluded). Results: bench/results/methods.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = {"full": "full.yaml", "lora": "lora.yaml", "qlora-nf4": "qlora-nf4.yaml", "qlora-fp4": "qlora-fp4.yaml"}


def main() -> None:
    import ray

    from orchestrator import launch
    from orchestrator.config import load_job

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quickstart = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "quickstart").resolve()
    out = Path(tempfile.mkdtemp(prefix="rayft-bench-"))
    ray.init(address="local", num_cpus=2 * (os.cpu_count() or 1), include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows = {}
    for name, file in EXAMPLES.items():
        examples = out / "examples"
        examples.mkdir(exist_ok=True)
        (examples / file).write_text((REPO / "examples" / file).read_text())
        (out / "quickstart").exists() or (out / "quickstart").symlink_to(quickstart)
        job, _ = load_job(examples / file, [f"output={out / 'runs'}"])
        m = launch.train(job, progress=False).manifest
        rows[name] = {
            "steps_per_s": m["metrics"]["steps_per_s"],
            "tokens_per_s": m["metrics"]["tokens_per_s"],
            "eval_accuracy": m["metrics"]["eval_accuracy"],
            "trainable_params": m["trainable_params"],
            "fit_s": m["timings"]["fit_s"],
        }
    ray.shutdown()
    result = {"machine": {"cores": os.cpu_count(), "cpu": platform.processor() or platform.machine()}, "versions": launch.versions(), "methods": rows}
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "bench" / "results" / "methods.json").write_text(json.dumps(result, indent=2))
    base = rows["full"]["steps_per_s"]
    print("| method | steps/s | tokens/s | vs full | trainable params | eval accuracy |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['steps_per_s']:.1f} | {r['tokens_per_s']:,.0f} | {r['steps_per_s'] / base:.2f}x | {r['trainable_params']:,} | {r['eval_accuracy']:.1%} |")


if __name__ == "__main__":
    main()
