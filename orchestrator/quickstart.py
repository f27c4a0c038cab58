"""`rayft quickstart`: the offline demo, end to end on the real stack.

1. Build a tiny LLaVA-style VLM (SigLIP vision + Qwen2 text) from config, with a local tokenizer and processor.
2. Fully fine-tune it on the colour task (English answers) -> a base that knows colours.
3. QLoRA-adapt that base (NF4, bf16) to answer in French, which it has never produced -> merged model.
4. Print held-out accuracy before and after (teacher-forced, and the merged model's generated answers), the
   merged model path, and one answer from the merged model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import IO, Any

import yaml

from orchestrator import tinymodels

TRAIN_ROWS, EVAL_ROWS = 512, 128
GENERATE_ROWS = 32


def job_files(root: Path) -> dict[str, Path]:
    """Write the quickstart's job files (paths relative to the job file, so they run from any cwd)."""
    jobs = root / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    common_train = {"micro_batch_size": 16, "eval_every": 16, "checkpoint_every": 32, "log_every": 4, "warmup_ratio": 0.05}
    base = {
        "name": "base-colours",
        "model": "../init",
        "data": {"train": "../data/english_train.parquet", "eval": "../data/english_eval.parquet", "max_length": 64},
        "method": "full",
        "precision": "bf16",
        "train": {**common_train, "epochs": 2, "lr": 3.0e-3},
        "output": "../runs",
    }
    qlora = {
        "name": "colours-french-qlora",
        "model": "../base",
        "data": {"train": "../data/french_train.parquet", "eval": "../data/french_eval.parquet", "max_length": 64},
        "method": "qlora",
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
        "quantization": {"type": "nf4", "double_quant": True},
        "precision": "bf16",
        "train": {**common_train, "epochs": 2, "lr": 5.0e-3},
        # answers are one word (one token + end of turn): greedy answers to the first 32 eval rows at each eval
        # and one eval before the first step: the accuracy before adapting (0%: the base never answered in French)
        "eval": {"at_start": True, "generate": {"samples": GENERATE_ROWS, "max_new_tokens": 4}},
        "output": "../runs",
    }
    paths = {}
    for name, body in (("base", base), ("qlora", qlora)):
        paths[name] = jobs / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(body, sort_keys=False))
    return paths


def build(root: Path) -> dict[str, Path]:
    """Model, data and job files; idempotent."""
    if not (root / "init" / "config.json").is_file():
        tinymodels.build_tiny_llava(root / "init")
    for task, seed in (("english", 0), ("french", 1)):
        if not (root / "data" / f"{task}_train.parquet").is_file():
            tinymodels.write_colour_data(root / "data", task, TRAIN_ROWS, EVAL_ROWS, seed=seed)
    return job_files(root)


def answer(model_dir: Path, image: bytes, question: str) -> str:
    """Greedy answer from a merged model loaded with plain transformers (no peft, no bitsandbytes)."""
    import io

    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from jobs.data import prompt_text

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = prompt_text(processor, question, with_image=True)
    inputs = processor(images=[Image.open(io.BytesIO(image)).convert("RGB")], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def run(root: str | Path, stream: IO[str]) -> dict[str, Any]:
    import time

    from orchestrator import launch
    from orchestrator.config import load_job

    t0 = time.time()
    root = Path(root).resolve()
    jobs = build(root)
    print(f"built tiny VLM and colour data under {root} ({time.time() - t0:.1f}s)", file=stream, flush=True)

    job, _ = load_job(jobs["base"])
    print("1/2 full fine-tuning the base on the English colour task", file=stream, flush=True)
    base = launch.train(job, stream=stream)
    shutil.rmtree(root / "base", ignore_errors=True)
    shutil.copytree(base.model_dir, root / "base")

    job, _ = load_job(jobs["qlora"])
    print("2/2 QLoRA (NF4, bf16) adapting the base to answer in French", file=stream, flush=True)
    adapted = launch.train(job, stream=stream)

    import pyarrow.parquet as pq

    row = pq.read_table(job.data.eval).slice(0, 1).to_pylist()[0]
    reply = answer(adapted.model_dir, row["image"], row["question"])
    metrics = adapted.manifest["metrics"]
    generation = adapted.manifest["generation"]["merged"]
    merged_generated = generation.get("accuracy")
    if generation.get("ran"):
        print(f"merged model, {len(generation['samples'])} held-out rows: generated answers exact {merged_generated:.1%}, "
              f"teacher-forced accuracy {adapted.manifest['parity']['merged_accuracy']:.1%}", file=stream, flush=True)
    summary = {
        "base_accuracy_english": base.manifest["metrics"]["eval_accuracy"],
        "before_accuracy_french": metrics["initial_eval_accuracy"],
        "after_accuracy_french": metrics["eval_accuracy"],
        "merged_model": str(adapted.model_dir),
        "sample": {"question": row["question"], "expected": row["answer"], "merged_model_answer": reply},
        "merged_generated_accuracy_french": merged_generated,
        "parity_max_abs_logit_diff": adapted.manifest["parity"]["checks"]["end_to_end"].get("max_abs_logit_diff"),
        "wall_s": round(time.time() - t0, 1),
    }
    return summary
