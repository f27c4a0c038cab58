"""rayft's training step against HF Trainer + PEFT defaults on varied-length VLM rows, at two model shapes, and where
the gain comes from (issue 31, item 6).

    scripts/netns.sh .venv/bin/python bench/vlm_lead.py [--shapes 51m qwen2-vocab] [--methods full lora qlora]
        [--steps 6 --warmup 2 --rounds 1] [--accuracy --epochs 2]

Rows: the colour task with 0-370 filler words in each question (~25-400 tokens a row, 16 image tokens included)
and images of 48-160 pixels a side (LLaVA's processor resizes each to its fixed input). Model shapes, LLaVA-style
(SigLIP vision 384 x 2 layers + Qwen2 text), built from config:
- 51m: text 1024 x 4 layers, MLP 2816, the tokenizer's own ~40-word vocabulary (bench/hf_compare.py's model);
- qwen2-vocab: text 896 x 2 layers, MLP 4864 (Qwen2-0.5B's width), a 151,646-token vocabulary (Qwen2's): the
  embedding and the head are most of the weights, and the logits the largest activation.

Contenders, each in a fresh process (bench/hf_compare.py's run_hf / run_rayft), the same rows, model, dtypes,
LoRA (rank 16, alpha 32, dropout 0), AdamW, learning rate and cosine schedule, micro batch 8 rows (or, packed,
8 x the mean row length in tokens):
- hf: transformers.Trainer (+ peft, + bitsandbytes NF4 for qlora) with its defaults: rows in random order, each
  batch padded to its longest row, the model's own loss (logits at every position);
- length_grouped: rayft's step, rows grouped by length (mega batches of 50), logits at answer positions only;
- packed: rayft's step, rows packed into one sequence per micro batch (data.batching: packed), logits at answer
  positions only;
- packed_full_logits: packed, with the head at every position (the ablation of logits-where-the-loss-is);
- rayft_train: the `rayft train` command (length_grouped) on an embedded Ray, rates from its metrics.jsonl
  (bench/hf_compare.run_rayft_train: the worker's per-step windows after --warmup; peak RSS the worker's).
Useful (non-pad) tokens/s over --steps timed steps after --warmup, and peak RSS of each process.

--accuracy: held-out answer accuracy after --epochs on 1,024 rows (256 held out), hf against packed, on the
smaller model of bench/length_batching.py (text 256 x 4): training the shapes above to convergence is hours on
two CPU cores. Results: bench/results/vlm_lead.json.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time
from pathlib import Path
from typing import Any

from common import alternate, ratio, write_result
from hf_compare import child
from length_batching import train_base

SHAPES = {
    "51m": {"hidden": 1024, "layers": 4, "intermediate": 2816, "vision_hidden": 384, "vision_layers": 2},
    "qwen2-vocab": {"hidden": 896, "layers": 2, "intermediate": 4864, "vision_hidden": 384, "vision_layers": 2, "vocab": 151_646},
    "small": {"hidden": 256, "layers": 4},  # --accuracy
}
METHOD = {"full": {"method": "full", "quantization": {"type": "none"}}, "lora": {"method": "lora", "quantization": {"type": "none"}},
          "qlora": {"method": "qlora", "quantization": {"type": "nf4", "double_quant": True}}}
LR = {"full": 1e-3, "lora": 5e-3, "qlora": 5e-3}
MICRO = 8
TRAIN_ROWS, EVAL_ROWS = 1024, 256  # --accuracy
THROUGHPUT_ROWS = 256  # more than the timed steps read
CONTENDERS = ("hf", "length_grouped", "packed", "packed_full_logits", "rayft_train")


def varied(n: int, task: str, seed: int) -> list[dict[str, Any]]:
    """Colour rows of ~25-400 tokens with images of several sizes."""
    from PIL import Image

    from orchestrator import tinymodels

    rng = random.Random(seed)
    rows = tinymodels.colour_rows(n, task, seed=seed)
    for r in rows:
        r["question"] = " ".join(["the"] * rng.randint(0, 370)) + " " + r["question"]
        w, h = rng.choice([48, 64, 96, 160]), rng.choice([48, 64, 96, 160])
        buf = io.BytesIO()
        Image.open(io.BytesIO(r["image"])).resize((w, h)).save(buf, format="PNG")
        r["image"] = buf.getvalue()
    return rows


def raw(method: str, model: Path, data: dict[str, Path], contender: str, steps: int | None, epochs: int, mean_len: int, out: Path) -> dict[str, Any]:
    """The job of one contender; data without "eval": no held-out eval (throughput runs)."""
    batching = {"hf": "rows", "length_grouped": "length_grouped", "rayft_train": "length_grouped"}.get(contender, "packed")
    return {
        "name": f"lead-{method}-{contender}", "model": str(model), "output": str(out),
        "data": {"train": str(data["train"]), **({"eval": str(data["eval"])} if "eval" in data else {}), "max_length": 420, "batching": batching,
                 **({"batch_tokens": max(420, MICRO * mean_len)} if batching == "packed" else {})},
        **METHOD[method], "lora": {"rank": 16, "alpha": 32, "dropout": 0.0}, "precision": "bf16",
        "train": {"epochs": epochs, "max_steps": steps, "micro_batch_size": MICRO, "lr": LR[method], "schedule": "cosine", "warmup_ratio": 0.0,
                  "weight_decay": 0.0, "max_grad_norm": 1.0, "eval_every": 10**6, "checkpoint_every": 10**6},
        "scaling": {"workers": 1, "gpu": "off"},
    }


def run(contender: str, job: dict[str, Any], warmup: int) -> dict[str, Any]:
    if contender == "rayft_train":  # the whole command on the embedded Ray this process started; rates from its metrics
        from hf_compare import run_rayft_train

        return run_rayft_train({**job, "train": {**job["train"], "log_every": 1}}, warmup)
    return child("hf" if contender == "hf" else "rayft", job, warmup, full_logits=contender == "packed_full_logits")


def material(work: Path, shape: str, rows: int) -> tuple[Path, dict[str, dict[str, Path]], int]:
    from orchestrator import tinymodels

    init = work / shape / "init"
    if not (init / "config.json").is_file():
        tinymodels.build_tiny_llava(init, **SHAPES[shape])
    data = {}
    for task in ("english", "french"):
        data[task] = {"train": tinymodels.write_parquet(varied(rows, task, 1), work / f"{task}-train-{rows}.parquet"),
                      "eval": tinymodels.write_parquet(varied(EVAL_ROWS, task, 2), work / f"{task}-eval.parquet")}
    mean_len = int(statistics.mean(len(r["question"].split()) + 16 + 12 for r in varied(rows, "english", 1)))  # word-level tokenizer
    return init, data, mean_len


def throughput(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    results: dict[str, Any] = {}
    summary = []
    if "rayft_train" in args.contenders:
        import os

        from orchestrator import launch

        launch.ensure_local_ray(os.cpu_count() or 1)
    for shape in args.shapes:
        init, data, mean_len = material(work, shape, THROUGHPUT_ROWS)
        for method in args.methods:
            # lora/qlora adapt the random-init model here: the step's cost does not depend on what the weights hold
            train_only = {"train": data["english"]["train"]}  # rows enough for the steps; no held-out eval (its cost is not the step's)
            jobs = {c: raw(method, init, train_only, c, args.warmup + args.steps, 1, mean_len, work / "runs") for c in args.contenders}
            print(f"{shape} {method}:", flush=True)
            got = alternate({c: (lambda c=c, job=job: run(c, job, args.warmup)) for c, job in jobs.items()}, rounds=args.rounds)
            results[f"{shape} {method}"] = got
            med = {c: v["median"] for c, v in got.items()}
            hf = med["hf"]
            for c in (c for c in args.contenders if c != "hf"):
                summary.append({
                    "benchmark": f"VLM step vs HF Trainer + PEFT ({shape}, rows of 25-400 tokens)", "measure": f"{method} {c}: useful tokens/s",
                    "rayft": round(med[c]["tokens_per_s"]), "baseline": round(hf["tokens_per_s"]), "ratio": ratio(med[c]["tokens_per_s"], hf["tokens_per_s"]),
                    "note": f"padding {format(med[c]['padding'], '.0%') if 'padding' in med[c] else 'n/a'} vs {hf['padding']:.0%}; peak RSS {med[c]['peak_rss_mib']:.0f} vs {hf['peak_rss_mib']:.0f} MiB; "
                            f"{args.steps} steps after {args.warmup}, median of {args.rounds}",
                })
                print(f"  {c}: {summary[-1]['ratio']}x useful tokens/s ({summary[-1]['rayft']} vs {summary[-1]['baseline']}), {summary[-1]['note']}", flush=True)
    return results, summary


def accuracy(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    init, data, mean_len = material(work, "small", TRAIN_ROWS)
    results: dict[str, Any] = {}
    summary = []
    for method in args.methods:
        model, d = (init, data["english"]) if method == "full" else (train_base(raw("full", init, data["english"], "length_grouped", None, args.epochs, mean_len, work / "small" / "runs"), work / "small" / "base"), data["french"])
        steps = args.epochs * (TRAIN_ROWS // MICRO)
        jobs = {c: raw(method, model, d, c, steps if c == "hf" else None, args.epochs, mean_len, work / "runs") for c in ("hf", "packed")}
        print(f"accuracy {method}:", flush=True)
        got = alternate({c: (lambda c=c, job=job: run(c, job, args.warmup)) for c, job in jobs.items()}, rounds=1)
        results[method] = got
        hf, packed = got["hf"]["median"], got["packed"]["median"]
        summary.append({
            "benchmark": "VLM held-out accuracy (small model, rows of 25-400 tokens)", "measure": f"{method} packed: held-out accuracy",
            "rayft": round(packed.get("eval_accuracy", 0), 3), "baseline": round(hf.get("eval_accuracy", 0), 3),
            "ratio": ratio(packed.get("eval_accuracy", 0), max(1e-9, hf.get("eval_accuracy", 0))),
            "note": f"{args.epochs} epochs of {TRAIN_ROWS} rows; eval loss {packed.get('eval_loss', 0):.4f} vs {hf.get('eval_loss', 0):.4f}; "
                    f"useful tokens/s {packed['tokens_per_s']:.0f} vs {hf['tokens_per_s']:.0f}",
        })
        print(f"  {summary[-1]}", flush=True)
    return results, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["51m", "qwen2-vocab"], choices=["51m", "qwen2-vocab"])
    ap.add_argument("--methods", nargs="+", default=list(METHOD), choices=list(METHOD))
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--accuracy", action="store_true", help="held-out accuracy on the small model instead of throughput")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/rayft-vlm-lead"))
    ap.add_argument("--name", default="vlm_lead")
    args = ap.parse_args()
    if "hf" not in args.contenders:
        args.contenders.insert(0, "hf")
    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    results, summary = accuracy(args, args.work) if args.accuracy else throughput(args, args.work)
    write_result(args.name, {"setup": {**{k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "micro_batch": MICRO,
                                       "shapes": {s: SHAPES[s] for s in (["small"] if args.accuracy else args.shapes)}},
                             "results": results, "wall_s": time.time() - t0}, summary=summary)


if __name__ == "__main__":
    main()
