"""Held-out accuracy on the standard chat layout, per architecture, from random init.

    scripts/netns.sh .venv/bin/python bench/chat_accuracy.py [--runs llava:full idefics3:full qwen2_vl:full qwen2_vl:qlora]

The colour task (8 colours, chance 12.5%) written as Hugging Face datasets writes a chat set: `messages`
with content parts ({"type": "image"}, {"type": "text"}) and an `images` list column of {bytes, path}.
512 training rows, 128 held-out, micro batch 16, bf16, through `rayft train`'s own code path
(launch.train on an embedded Ray). Qwen2-VL is saved with the stock processor config (no torchvision
here: the image-only processor) and trained both fully and with QLoRA over an FP4 base.
Results: bench/results/chat_accuracy.json (tests/test_chat.py asserts > 3x chance on three of them).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import write_result

SETTINGS: dict[str, dict[str, Any]] = {
    "full": {"epochs": 2, "lr": 3e-3},
    "qlora": {"epochs": 4, "lr": 5e-3, "quantization": {"type": "fp4", "double_quant": False}, "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}},
}


def run(arch: str, method: str, out: Path) -> dict[str, Any]:
    from orchestrator import launch, tinymodels
    from orchestrator.config import build_job

    s = SETTINGS[method]
    raw = tinymodels.chat_colour_job(arch, method, out, s["epochs"], s["lr"], **{k: v for k, v in s.items() if k in ("quantization", "lora")})
    job, _ = build_job(raw)
    t0 = time.time()
    outcome = launch.train(job, progress=False)
    m = outcome.manifest["metrics"]
    return {"arch": arch, "method": method, "epochs": s["epochs"], "steps": m["step"], "before": m["initial_eval_accuracy"],
            "after": m["eval_accuracy"], "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    import ray

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="+", default=["llava:full", "idefics3:full", "qwen2_vl:full", "qwen2_vl:qlora"])
    args = parser.parse_args()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.runs:
            arch, method = spec.split(":")
            rows.append(run(arch, method, Path(tmp) / spec.replace(":", "-")))
    ray.shutdown()
    print("| architecture | method | epochs (steps) | accuracy before -> after | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['arch']} | {r['method']} | {r['epochs']} ({r['steps']}) | {r['before']:.1%} -> {r['after']:.1%} | {r['wall_s']} |")
    write_result("chat_accuracy", {"runs": rows}, rows)


if __name__ == "__main__":
    main()
