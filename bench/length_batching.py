"""Length-aware batching against today's batching and HF Trainer's defaults, on rows of varied length.

    scripts/netns.sh .venv/bin/python bench/length_batching.py [--rounds 2] [--epochs 3] [--methods full lora qlora]

Rows: the quickstart's colour task, each question padded with 0-150 filler words, so a row is ~25-180 tokens
(16 image tokens included): 1024 training rows, 256 held-out. For each method, four contenders train the same
model on the same rows with the same optimizer, learning rate, schedule and micro batch (16), in one process
each (bench/hf_compare.py's contenders), alternated over --rounds:

- HF Trainer defaults: random order, each batch padded to its longest row (group_by_length off);
- rayft rows: today's batching (the same padding rule);
- rayft length_grouped: mega batches of 50 micro batches sorted by length, batches shuffled;
- rayft tokens: micro batches filled to data.batch_tokens = 16 x the mean row length padded tokens.

The model: the quickstart's tiny LLaVA widened to text hidden 256 x 4 layers (at the quickstart's 64 x 2 a
step costs the same whatever its padding: overhead, not arithmetic). full trains it from random init on
English answers; lora and qlora (NF4) adapt a base trained by full fine-tuning first (rayft
length_grouped, --epochs) to French answers. Reported: useful (non-pad) tokens/s after
--warmup steps, the padded-token fraction, and held-out answer accuracy after the same number of epochs.
Results: bench/results/length_batching.json and the README table.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path
from typing import Any

from common import alternate, ratio, write_result
from hf_compare import child

TRAIN_ROWS, EVAL_ROWS, MICRO = 1024, 256, 16
LR = {"full": 1e-3, "lora": 5e-3, "qlora": 5e-3}
MODEL = {"hidden": 256, "layers": 4}
METHOD = {"full": {"method": "full", "quantization": {"type": "none"}}, "lora": {"method": "lora", "quantization": {"type": "none"}},
          "qlora": {"method": "qlora", "quantization": {"type": "nf4", "double_quant": True}}}


def varied(n: int, task: str, seed: int) -> list[dict[str, Any]]:
    from orchestrator import tinymodels

    rng = random.Random(seed)
    rows = tinymodels.colour_rows(n, task, seed=seed)
    for r in rows:
        r["question"] = " ".join(["the"] * rng.randint(0, 150)) + " " + r["question"]
    return rows


def raw(method: str, model: Path, data: dict[str, Path], batching: str, steps: int | None, epochs: int, mean_len: int, out: Path) -> dict[str, Any]:
    return {
        "name": f"length-{method}-{batching}", "model": str(model), "output": str(out),
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 200, "batching": "rows" if batching == "hf" else batching,
                 **({"batch_tokens": MICRO * mean_len} if batching == "tokens" else {})},
        **METHOD[method], "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}, "precision": "bf16",
        "train": {"epochs": epochs, "max_steps": steps, "micro_batch_size": MICRO, "lr": LR[method], "schedule": "cosine", "warmup_ratio": 0.0,
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "eval_every": 10**6, "checkpoint_every": 10**6},
        "scaling": {"workers": 1, "gpu": "off"},
    }


def train_base(base_job: dict[str, Any], base: Path) -> Path:
    """The lora/qlora base: base_job (a full fine-tuning job on English answers) trained in-process with rayft's step,
    saved to `base` (kept: a later run reuses it)."""
    import numpy as np
    import torch

    from jobs import batching
    from jobs import data as data_mod
    from jobs.model import load_processor
    from jobs.train_loop import build_training, lr_lambda, optimizer_step
    from orchestrator import architectures
    from orchestrator.config import build_job

    if (base / "config.json").is_file():
        return base
    job, _ = build_job(base_job)
    arch = architectures.for_model_dir(job.model)
    processor = load_processor(job.model, arch)
    rows, _ = data_mod.encode_rows(job.data.train, job.data, processor, True)
    by_id = {e.row: e for e in rows}
    plan = batching.build_schedule(np.array([e.row for e in rows]), np.array([len(e.input_ids) for e in rows]), job.train, job.data, 1)
    from functools import partial

    training = build_training(job, arch, torch.device("cpu"), 1, partial(lr_lambda, total=plan.total_steps, warmup=0, schedule="cosine"), None)
    for step in plan.steps:
        optimizer_step(training, [data_mod.collate([by_id[int(i)] for i in m[0]], processor.tokenizer.pad_token_id) for m in step], torch.device("cpu"))
    training.core.save_pretrained(base)
    processor.save_pretrained(base)
    return base


def main() -> None:
    from orchestrator import tinymodels

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=["full", "lora", "qlora"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/rayft-length-batching"))
    args = ap.parse_args()
    t0 = time.time()
    work = args.work
    if not (work / "init" / "config.json").is_file():
        tinymodels.build_tiny_llava(work / "init", **MODEL)
    data = {}
    for task in ("english", "french"):
        data[task] = {"train": tinymodels.write_parquet(varied(TRAIN_ROWS, task, 1), work / f"varied-{task}-train.parquet"),
                      "eval": tinymodels.write_parquet(varied(EVAL_ROWS, task, 2), work / f"varied-{task}-eval.parquet")}
    lengths = [len(r["question"].split()) + 16 + 12 for r in varied(TRAIN_ROWS, "english", 1)]  # words ~ tokens here (word-level tokenizer)
    mean_len = int(statistics.mean(lengths))
    base = train_base(raw("full", work / "init", data["english"], "length_grouped", None, args.epochs, 0, work / "runs"), work / "base") if set(args.methods) - {"full"} else work / "init"
    steps = args.epochs * (TRAIN_ROWS // MICRO)
    results: dict[str, Any] = {}
    summary = []
    for method in args.methods:
        model, d = (work / "init", data["english"]) if method == "full" else (base, data["french"])
        jobs = {name: raw(method, model, d, name, None if name == "tokens" else steps, args.epochs, mean_len, work / "runs")
                for name in ("hf", "rows", "length_grouped", "tokens")}
        contenders = {name: (lambda name=name, job=job: child("hf" if name == "hf" else "rayft", job, args.warmup)) for name, job in jobs.items()}
        print(f"{method}:", flush=True)
        results[method] = alternate(contenders, rounds=args.rounds)
        med = {k: v["median"] for k, v in results[method].items()}
        for name in ("length_grouped", "tokens", "rows"):
            summary.append({
                "benchmark": "length-aware batching (rows of 25-180 tokens)", "measure": f"{method} {name}: useful tokens/s",
                "rayft": round(med[name]["tokens_per_s"]), "baseline": round(med["hf"]["tokens_per_s"]),
                "ratio": ratio(med[name]["tokens_per_s"], med["hf"]["tokens_per_s"]),
                "note": f"baseline: HF Trainer defaults; padding {med[name]['padding']:.0%} vs {med['hf']['padding']:.0%}; "
                        f"held-out accuracy {med[name].get('eval_accuracy', 0):.0%} vs {med['hf'].get('eval_accuracy', 0):.0%}",
            })
    write_result("length_batching", {"setup": {**vars(args), "work": str(work), "rows": TRAIN_ROWS, "micro_batch": MICRO, "mean_length": mean_len},
                                     "methods": results, "wall_s": time.time() - t0}, summary=summary)
    for r in summary:
        print(r)


if __name__ == "__main__":
    main()
