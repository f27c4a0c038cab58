"""rayft's training step against the standard stack (Hugging Face Trainer + PEFT + bitsandbytes), per method.

    scripts/netns.sh .venv/bin/python bench/hf_compare.py [--steps 10 --warmup 2 --rounds 2 --methods full lora]

One ~51M-parameter LLaVA-style VLM (SigLIP vision 384 x 2 layers + Qwen2 text 1024 x 4 layers, MLP 2816) is
built from config; 128 synthetic colour rows are its data. For each method (full, lora, qlora-nf4, qlora-fp4),
in bf16 at micro batch 8, three contenders train it:

- rayft (in-process): the functions the Ray worker runs (jobs.train_loop.build_training, optimizer_step,
  jobs.batching.build_schedule, jobs.data.collate), without Ray;
- HF Trainer: AutoModelForImageTextToText.from_pretrained (+ peft LoraConfig/get_peft_model, + BitsAndBytesConfig
  for qlora) and transformers.Trainer with its defaults (optimizer adamw_torch_fused), fed the same encoded rows
  and the same collate function;
- rayft train (local Ray): the `rayft train` command, rates from its metrics.jsonl; one run per method.

Both in-process contenders get the same model directory, dtypes, quantization, LoRA config (rank 16, alpha 32,
dropout 0.05, rayft's target regex), AdamW (lr 2e-4, no weight decay, cosine, no warm-up), clipping at 1.0 and
torch threads = all cores. The first `--warmup` steps are not timed; a step is timed end to end (from the end
of the previous optimizer step: data, collation, forward, backward, clipping, optimizer, callbacks). Each
in-process contender runs in a fresh subprocess (so peak RSS is its own), alternated A B A B over `--rounds`.
Tokens are non-pad tokens, image tokens included (sum of attention_mask), counted from the collated batches.
Results: bench/results/hf_compare.json.

Run it on an otherwise idle machine: torch runs a thread per core, and a neighbour busy on one core slowed a
step here up to 15x. Runs whose process got under 90% of the cores are listed as starved (JSON and output).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import alternate, ratio, write_result

METHODS: dict[str, dict[str, Any]] = {
    "full": {"method": "full", "quantization": {"type": "none"}},
    "lora": {"method": "lora", "quantization": {"type": "none"}},
    "qlora-nf4": {"method": "qlora", "quantization": {"type": "nf4", "double_quant": True}},
    "qlora-fp4": {"method": "qlora", "quantization": {"type": "fp4", "double_quant": True}},
}
MODEL = {"hidden": 1024, "layers": 4, "intermediate": 2816, "vision_hidden": 384, "vision_layers": 2}
ROWS = 128
MICRO_BATCH = 8
LR = 2e-4


def build_material(work: Path) -> tuple[Path, Path]:
    from orchestrator import tinymodels

    model_dir = tinymodels.build_tiny_llava(work / "model", **MODEL)
    data = tinymodels.write_parquet(tinymodels.colour_rows(ROWS, "english"), work / "train.parquet")
    return model_dir, data


def job_raw(method: str, model_dir: Path, data: Path, steps: int, output: Path) -> dict[str, Any]:
    """The rayft job both rayft contenders run; the HF contender reads its values from the same job."""
    return {
        "name": f"hf-compare-{method}",
        "model": str(model_dir),
        "data": {"train": str(data), "max_length": 64},
        **METHODS[method],
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05},
        "precision": "bf16",
        "train": {
            "max_steps": steps,
            "micro_batch_size": MICRO_BATCH,
            "lr": LR,
            "schedule": "cosine",
            "warmup_ratio": 0.0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "log_every": 1,
            "eval_every": 10**6,
            "checkpoint_every": 10**6,
        },
        "scaling": {"workers": 1, "gpu": "off"},
        "output": str(output),
    }


def rates(step_ends: list[tuple[float, float]], step_tokens: list[int], warmup: int, step_samples: list[int] | None = None) -> dict[str, float]:
    """Samples/s and tokens/s over the steps after warm-up. Step i ended at step_ends[i] = (wall clock, this
    process's CPU time) and trained on step_tokens[i] tokens (the Trainer's data loader collates one batch
    ahead: later entries are unused) and step_samples[i] rows (default: MICRO_BATCH). cpu_per_wall near the
    thread count means the process was not starved."""
    (wall0, cpu0), (wall1, cpu1) = step_ends[warmup - 1], step_ends[-1]
    timed = len(step_ends) - warmup
    samples = sum(step_samples[warmup : len(step_ends)]) if step_samples else timed * MICRO_BATCH
    return {
        "samples_per_s": samples / (wall1 - wall0),
        "tokens_per_s": sum(step_tokens[warmup : len(step_ends)]) / (wall1 - wall0),
        "step_s": (wall1 - wall0) / timed,
        "cpu_per_wall": (cpu1 - cpu0) / (wall1 - wall0),
    }


def now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- contenders, each run in its own subprocess ------------------------------------------------------


def held_out(model: Any, job: Any, processor: Any, autocast: Any, input_dtype: Any = None) -> dict[str, float]:
    """Eval loss and answer accuracy on job.data.eval (when the job has one), as the worker evaluates."""
    import torch

    from jobs import data as data_mod
    from jobs.evaluate import evaluate

    if not job.data.eval:
        return {}
    rows, _ = data_mod.encode_rows(job.data.eval, job.data, processor, True)
    mbs = job.train.micro_batch_size
    batches = [data_mod.collate(rows[i : i + mbs], processor.tokenizer.pad_token_id) for i in range(0, len(rows), mbs)]
    out = evaluate(model, batches, torch.device("cpu"), autocast, input_dtype)
    return {"eval_accuracy": out["eval_accuracy"], "eval_loss": out["eval_loss"]}


def run_rayft(raw: dict[str, Any], warmup: int) -> dict[str, float]:
    """The worker's own functions, step by step as train_fn_per_worker calls them (1 worker, no Ray), over
    the batch schedule the driver computes (data.batching as the job says)."""
    from functools import partial

    import numpy as np
    import torch

    from jobs import batching
    from jobs import data as data_mod
    from jobs.model import load_processor
    from jobs.train_loop import build_training, lr_lambda, optimizer_step
    from orchestrator import architectures
    from orchestrator.config import build_job

    job, _ = build_job(raw)
    torch.set_num_threads(os.cpu_count() or 1)
    device = torch.device("cpu")
    arch = architectures.for_model_dir(job.model)
    processor = load_processor(job.model, arch)
    pad_id = processor.tokenizer.pad_token_id
    rows, _ = data_mod.encode_rows(job.data.train, job.data, processor, True)
    by_id = {e.row: e for e in rows}
    plan = batching.build_schedule(np.array([e.row for e in rows]), np.array([len(e.input_ids) for e in rows]), job.train, job.data, 1)
    schedule = partial(lr_lambda, total=plan.total_steps, warmup=0, schedule=job.train.schedule)
    training = build_training(job, arch, device, 1, schedule, None)
    if os.environ.get("RAYFT_BENCH_FULL_LOGITS") == "1":  # the ablation: logits at every position, as the model's own loss
        training.keep_logits = False
    training.model.train()
    packed_from = arch.first_position if job.data.batching == "packed" else None
    ends, tokens, samples, padded, losses = [], [], [], [], []
    for step in plan.steps:
        batches = [data_mod.collate([by_id[int(i)] for i in micro[0]], pad_id, packed_from) for micro in step]
        tokens.append(sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches))
        padded.append(sum(b["input_ids"].numel() for b in batches))
        samples.append(sum(len(micro[0]) for micro in step))
        losses.append(optimizer_step(training, batches, device))
        ends.append(now())
    return {
        **rates(ends, tokens, warmup, samples), "padding": 1 - sum(tokens) / sum(padded), "peak_rss_mib": peak_rss_mib(),
        "mean_loss": sum(losses) / len(losses), "load_1m": os.getloadavg()[0], "keep_logits": training.keep_logits,
        **held_out(training.model, job, processor, training.autocast, training.input_dtype),
    }


def run_hf(raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    """The standard recipe: from_pretrained (+ BitsAndBytesConfig) (+ get_peft_model) + Trainer."""
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        BitsAndBytesConfig,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from jobs import data as data_mod
    from jobs.model import load_processor
    from orchestrator import architectures
    from orchestrator.config import build_job

    job, _ = build_job(raw)
    torch.set_num_threads(os.cpu_count() or 1)
    arch = architectures.for_model_dir(job.model)
    processor = load_processor(job.model, arch)
    pad_id = processor.tokenizer.pad_token_id
    rows, _ = data_mod.encode_rows(job.data.train, job.data, processor, True)

    torch.manual_seed(job.train.seed)
    kwargs: dict[str, Any] = {"dtype": torch.float32 if job.method == "full" else torch.bfloat16}
    if job.method == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=job.quantization.type,
            bnb_4bit_use_double_quant=job.quantization.double_quant,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=list(arch.keep_out_of_4bit),
        )
    model = AutoModelForImageTextToText.from_pretrained(job.model, **kwargs)
    if job.method != "full":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=job.lora.rank, lora_alpha=job.lora.alpha, lora_dropout=job.lora.dropout, target_modules=arch.lora_target_regex(False), bias="none"
        )
        model = get_peft_model(model, lora)

    tokens: list[int] = []
    padded: list[int] = []

    def collate(examples: list[data_mod.Encoded]) -> dict[str, torch.Tensor]:
        batch = data_mod.collate(examples, pad_id)
        tokens.append(int(batch["attention_mask"].sum()))
        padded.append(batch["attention_mask"].numel())
        return batch

    ends: list[tuple[float, float]] = []

    class StepEnds(TrainerCallback):  # the Trainer's own hook interface
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            ends.append(now())

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            use_cpu=True,
            bf16=True,
            per_device_train_batch_size=job.train.micro_batch_size,
            gradient_accumulation_steps=job.train.grad_accum,
            max_steps=job.train.max_steps,
            learning_rate=job.train.lr,
            weight_decay=job.train.weight_decay,
            lr_scheduler_type=job.train.schedule,
            warmup_steps=0,
            max_grad_norm=job.train.max_grad_norm,
            seed=job.train.seed,
            report_to=[],
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
        )
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate, callbacks=[StepEnds()])
        mean_loss = trainer.train().training_loss
    optim = getattr(args.optim, "value", args.optim)
    from functools import partial

    n = len(ends)
    return {
        **rates(ends, tokens, warmup, [job.train.micro_batch_size] * n), "padding": 1 - sum(tokens[:n]) / sum(padded[:n]), "peak_rss_mib": peak_rss_mib(),
        "mean_loss": mean_loss,
        "load_1m": os.getloadavg()[0], "optim": optim, **held_out(model, job, processor, partial(torch.autocast, "cpu", dtype=torch.bfloat16)),
    }


def child(contender: str, raw: dict[str, Any], warmup: int, full_logits: bool = False) -> dict[str, float]:
    """Run one contender in a fresh Python process; its last stdout line is the result. full_logits (rayft): the
    head at every position (the ablation of logits-where-the-loss-is)."""
    cmd = [sys.executable, __file__, "--child", contender, "--raw", json.dumps(raw), "--warmup", str(warmup)]
    env = {**os.environ, "RAYFT_BENCH_FULL_LOGITS": "1" if full_logits else "0"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{contender} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_rayft_train(raw: dict[str, Any], warmup: int) -> dict[str, Any]:
    """What `rayft train` runs (launch.train: preflight, Ray Train with 1 worker holding every core, merge and
    export) on the embedded local Ray this process started. Rates are the train loop's own per-step windows
    after warm-up (metrics.jsonl); peak RSS is the worker's; wall_s is the whole run, export included."""
    from jobs.metrics_log import read_metrics
    from orchestrator import launch
    from orchestrator.config import build_job

    job, _ = build_job(raw)
    run_dir = launch.new_run_dir(job)
    t0 = time.time()
    export_error = None
    try:
        launch.train(job, progress=False, run_dir=run_dir)
    except launch.RunFailed as e:
        if not launch.finished(run_dir):  # training itself failed: no numbers
            raise
        export_error = str(e).splitlines()[0]  # trained to the end; the export refused (reported, not hidden)
    wall = time.time() - t0
    timed = [r for r in read_metrics(run_dir) if "steps_per_s" in r and r["step"] > warmup]
    elapsed = sum(1 / r["steps_per_s"] for r in timed)
    return {
        "samples_per_s": sum(r["samples_per_s"] / r["steps_per_s"] for r in timed) / elapsed,
        "tokens_per_s": sum(r["tokens_per_s"] / r["steps_per_s"] for r in timed) / elapsed,
        "step_s": elapsed / len(timed),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in timed),
        "wall_s": wall,
        "load_1m": os.getloadavg()[0],
        "export_error": export_error,
    }


# ---- the benchmark -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds of the in-process contenders")
    ap.add_argument("--no-ray", action="store_true", help="skip the `rayft train` runs")
    ap.add_argument("--ray-rounds", type=int, default=3, help="`rayft train` runs per method (methods alternated), median")
    ap.add_argument(
        "--ray-only", action="store_true",
        help="keep the in-process numbers already in the results file and (re)measure only the `rayft train` runs",
    )
    ap.add_argument("--name", default="hf_compare", help="results file name")
    ap.add_argument("--child", choices=["rayft", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--raw", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if args.child:
        run = run_rayft if args.child == "rayft" else run_hf
        print(json.dumps(run(json.loads(args.raw), args.warmup)))
        return

    t0, load_start = time.time(), os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="rayft-hf-compare-"))
    model_dir, data = build_material(work)
    params = count_params(model_dir)
    steps = args.warmup + args.steps
    setup = {
        "model": {**MODEL, "params": params, "model_type": "llava"},
        "rows": ROWS,
        "micro_batch_size": MICRO_BATCH,
        "lr": LR,
        "precision": "bf16",
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05},
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "threads": os.cpu_count(),
        "tokens": "non-pad tokens incl. image tokens (sum of attention_mask)",
        # load average (1, 5, 15 min): above the core count, other work shared the machine
        "load_avg_start": load_start,
    }
    results: dict[str, Any] = {}
    if args.ray_only:
        from common import RESULTS

        previous = json.loads((RESULTS / f"{args.name}.json").read_text())
        results = {m: {k: v for k, v in r.items() if k != "rayft_train"} for m, r in previous["methods"].items() if m in args.methods}
        setup = {**previous["setup"], "load_avg_start": load_start}
    for method in [] if args.ray_only else args.methods:  # written after each method: a run cut short keeps what it measured
        print(f"{method}:", flush=True)
        raw = job_raw(method, model_dir, data, steps, work / "runs")
        results[method] = alternate(
            {"rayft": lambda raw=raw: child("rayft", raw, args.warmup), "hf": lambda raw=raw: child("hf", raw, args.warmup)},
            rounds=args.rounds,
        )
        save(args.name, setup, results, t0)
    if not args.no_ray:
        import ray

        from orchestrator import launch

        launch.ensure_local_ray(os.cpu_count() or 1)
        print(f"rayft train (local Ray), methods alternated, {args.ray_rounds} round(s)", flush=True)
        runs = alternate(
            {m: (lambda m=m: run_rayft_train(job_raw(m, model_dir, data, steps, work / "runs"), args.warmup)) for m in args.methods},
            rounds=args.ray_rounds,
        )
        for method, r in runs.items():
            errors = [run["export_error"] for run in r["runs"] if run["export_error"]]
            results[method]["rayft_train"] = {"runs": r["runs"], "median": {**r["median"], "export_error": errors[0] if errors else None}}
        save(args.name, setup, results, t0)
        ray.shutdown()
    print_table(setup, results)


def save(name: str, setup: dict[str, Any], results: dict[str, Any], t0: float) -> None:
    note = f"in-process, {setup['model']['params'] / 1e6:.0f}M VLM, batch {MICRO_BATCH}, bf16, {setup['steps']} steps, median of {setup['rounds']}"
    summary = []
    for method, r in results.items():
        a, b = r["rayft"]["median"], r["hf"]["median"]
        summary += [
            summary_row(f"{method} samples/s", a["samples_per_s"], b["samples_per_s"], note),
            summary_row(f"{method} tokens/s", a["tokens_per_s"], b["tokens_per_s"], note),
            summary_row(f"{method} peak RSS MiB", a["peak_rss_mib"], b["peak_rss_mib"], "whole process, a fresh one per contender"),
        ]
        if "rayft_train" in r:
            ray = r["rayft_train"]["median"]
            n = len(r["rayft_train"]["runs"])
            ray_note = f"local Ray, 1 worker x all cores, median of {n} run(s); baseline: HF Trainer in-process"
            if ray["export_error"]:
                ray_note += f"; trained, but the export refused: {ray['export_error']}"
            summary.append(summary_row(f"{method} samples/s via `rayft train`", ray["samples_per_s"], b["samples_per_s"], ray_note))
    setup = {**setup, "wall_s": round(time.time() - t0, 1), "load_avg_end": os.getloadavg(), "starved_runs": starved_runs(results)}
    write_result(name, {"setup": setup, "methods": results}, summary=summary)


def print_table(setup: dict[str, Any], results: dict[str, Any]) -> None:
    print(
        f"model: {setup['model']['params'] / 1e6:.1f}M parameters, micro batch {MICRO_BATCH}, bf16, "
        f"{setup['steps']} timed steps, median of {setup['rounds']} rounds"
    )
    print("| method | rayft samples/s | HF samples/s | ratio | rayft tokens/s | HF tokens/s | `rayft train` samples/s | ratio | peak RSS MiB rayft / HF / Ray worker |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, r in results.items():
        a, b = r["rayft"]["median"], r["hf"]["median"]
        ray = r.get("rayft_train", {}).get("median")
        ray_rate = f"{ray['samples_per_s']:.2f} | {ray['samples_per_s'] / b['samples_per_s']:.2f}x" if ray else "- | -"
        ray_rss = f"{ray['peak_rss_mib']:.0f}" if ray else "-"
        print(
            f"| {method} | {a['samples_per_s']:.2f} | {b['samples_per_s']:.2f} | {a['samples_per_s'] / b['samples_per_s']:.2f}x "
            f"| {a['tokens_per_s']:.0f} | {b['tokens_per_s']:.0f} | {ray_rate} | {a['peak_rss_mib']:.0f} / {b['peak_rss_mib']:.0f} / {ray_rss} |"
        )
    end = os.getloadavg()[0]
    print(f"load average {setup['load_avg_start'][0]:.1f} at start, {end:.1f} at end ({os.cpu_count()} cores)")
    starved = starved_runs(results)
    if starved:
        print(f"WARNING: CPU-starved (another process shared the cores; these numbers do not hold): {', '.join(starved)}")


def starved_runs(results: dict[str, Any]) -> list[str]:
    """In-process runs whose threads got under 90% of the cores while timed. With torch's OpenMP threads on
    every core, a process competing for one core slowed a step here up to 15x (spinning threads), so a
    starved round says more about the neighbour than about the contender."""
    cores = os.cpu_count() or 1
    return [
        f"{method} {name} round {i + 1} ({run['cpu_per_wall']:.2f} of {cores} cores)"
        for method, r in results.items()
        for name in ("rayft", "hf")
        for i, run in enumerate(r[name]["runs"])
        if run["cpu_per_wall"] < 0.9 * cores
    ]


def summary_row(measure: str, rayft: float, baseline: float, note: str) -> dict[str, Any]:
    return {
        "benchmark": "train step vs HF Trainer",
        "measure": measure,
        "rayft": round(rayft, 2),
        "baseline": round(baseline, 2),
        "ratio": ratio(rayft, baseline),
        "note": note,
    }


def count_params(model_dir: Path) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
