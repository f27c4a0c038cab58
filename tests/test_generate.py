"""Generation-based evaluation (eval.generate): greedy answers from the training prompt, exact match on
normalized text, at every eval of a run, after export, and in the manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from orchestrator import tinymodels
from orchestrator.config import ConfigError, JobConfig, build_job


def test_normalize_ignores_case_spacing_and_trailing_punctuation():
    from jobs.generate import normalize

    assert normalize("  Rouge.\n") == "rouge"
    assert normalize("dark \t BLUE !?") == "dark blue"
    assert normalize("a.b") == "a.b"  # only trailing punctuation goes
    assert normalize("rouge") != normalize("rouges")
    assert normalize("...") == ""


def test_tune_may_rank_trials_by_generated_accuracy(world, tmp_path):
    from orchestrator.config import load_search

    raw = {
        "model": str(world / "init"), "method": "full", "output": str(tmp_path),
        "data": {"train": str(world / "data/english_train.parquet"), "eval": str(world / "data/english_eval.parquet")},
        "tune": {"metric": "eval_generated_accuracy", "space": {"train.lr": {"choice": [1e-3, 2e-3]}}},
    }
    path = tmp_path / "search.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as e:
        load_search(path)
    assert any(p.path == "tune.metric" and "eval.generate" in p.fix for p in e.value.problems)
    path.write_text(json.dumps({**raw, "eval": {"generate": {"samples": 4}}}))
    job, _, _ = load_search(path)
    assert job.tune is not None and job.tune.resolved_mode == "max"


def two_turn_row(row: dict[str, Any]) -> dict[str, Any]:
    """A chat row whose answer is its second assistant turn: the first turn and its answer are prompt."""
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": row["question"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
            {"role": "user", "content": [{"type": "text", "text": "what colour is the shape ? answer in french ."}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]},
        ],
        "images": [{"bytes": row["image"], "path": None}],
    }


ARCHS = ["llava", "idefics3", "qwen2_vl", "paligemma", "text"]


@pytest.mark.parametrize("name", ARCHS)
def test_generation_starts_from_the_training_prompt(name: str, tmp_path: Path) -> None:
    """On every architecture of the matrix (random weights): the prompt is the training encoding cut where the
    answer starts, and the first generated token is the teacher-forced prediction at that position."""
    import torch

    from jobs.data import encode_row, read_table
    from jobs.generate import generate, prompts
    from jobs.model import load_processor, model_class
    from orchestrator.architectures import for_model_dir

    torch.set_num_threads(1)
    tinymodels.qwen2_vl_image_processor_class()
    model_dir = tinymodels.build_tiny_text(tmp_path / "m") if name == "text" else tinymodels.TINY_VLMS[name](tmp_path / "m")
    arch = for_model_dir(model_dir)
    rows = tinymodels.colour_rows(3, task="french", seed=3)
    data = tinymodels.write_parquet([{k: v for k, v in r.items() if k != "image" or name != "text"} for r in rows], tmp_path / "eval.parquet")
    job = JobConfig.model_validate({"model": str(model_dir), "method": "full", "data": {"train": str(data), "eval": str(data), "max_length": 64},
                                    "eval": {"generate": {"samples": 2, "max_new_tokens": 3}}})
    processor = load_processor(str(model_dir), arch)
    model = model_class(arch).from_pretrained(model_dir, dtype=torch.float32).eval()
    found = prompts(job, processor, arch)
    assert len(found) == 2 and found[0].prompt == rows[0]["question"] and found[0].expected == rows[0]["answer"]
    tok = getattr(processor, "tokenizer", processor)
    for i, p in enumerate(found):
        full = encode_row(read_table(data).to_pylist()[i], i, job.data, processor, arch.kind == "vlm", data)
        n = len(full.input_ids) - p.inputs["input_ids"].shape[1]
        assert n == len(tok(p.expected, add_special_tokens=False)["input_ids"]) + 1  # the answer and its eos
        assert torch.equal(p.inputs["input_ids"][0], full.input_ids[:-n])
        with torch.no_grad():
            batch = {k: (v[None] if k != "input_ids" and v.dim() == 1 else v) for k, v in full.extras.items()}
            logits = model(input_ids=full.input_ids[None], attention_mask=torch.ones_like(full.input_ids)[None], **batch).logits
        first = int(logits[0, -n - 1].argmax())
        out = model.generate(**p.inputs, do_sample=False, max_new_tokens=1)
        assert int(out[0, -1]) == first
    result = generate(model, processor, job, found)
    assert len(result["samples"]) == 2 and 0.0 <= result["accuracy"] <= 1.0
    assert all(isinstance(s["generated"], str) and s["correct"] in (True, False) for s in result["samples"])
    assert not model.training


def test_chat_rows_answer_the_last_turn(world, tmp_path):
    """messages rows: the expected answer is the last assistant turn; earlier turns (and their answers) are
    prompt. A model trained on the prompt/answer layout answers the same rows in the chat layout, whose
    template renders them alike."""
    import torch

    from jobs.generate import generate, prompts
    from jobs.model import load_processor, model_class
    from orchestrator.architectures import for_model_dir

    rows = tinymodels.colour_rows(4, task="french", seed=11)
    data = tinymodels.write_chat_parquet([two_turn_row(r) for r in rows], tmp_path / "chat.parquet")
    model_dir = world / "init"
    arch = for_model_dir(model_dir)
    job = JobConfig.model_validate({"model": str(model_dir), "method": "full", "eval": {"generate": {"samples": 4, "max_new_tokens": 3}},
                                    "data": {"train": str(data), "eval": str(data), "messages": "messages", "images": "images", "max_length": 64}})
    processor = load_processor(str(model_dir), arch)
    found = prompts(job, processor, arch)
    assert [p.expected for p in found] == [r["answer"] for r in rows]
    assert {p.prompt for p in found} == {"what colour is the shape ? answer in french ."}
    assert processor.tokenizer.convert_tokens_to_ids("blue") in found[0].inputs["input_ids"][0].tolist()  # the first turn's answer
    model = model_class(arch).from_pretrained(model_dir, dtype=torch.float32)
    result = generate(model, processor, job, found)
    assert [s["expected"] for s in result["samples"]] == [r["answer"] for r in rows]


def test_a_run_with_eval_generate_reports_generated_accuracy_and_samples(quickstart_run):
    """The quickstart's QLoRA job turns eval.generate on: every eval has eval_generated_accuracy and a
    generations record; the manifest holds the answers at the exported step and the merged model's."""
    from conftest import CHANCE

    run_dir = Path(quickstart_run["merged_model"]).parent
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    generations = {r["step"]: r for r in records if r["event"] == "generations"}
    assert [r["step"] for r in evals] == sorted(generations) and evals[0]["step"] == 0
    assert all(r["eval_generated_accuracy"] == generations[r["step"]]["accuracy"] for r in evals)
    assert evals[0]["eval_generated_accuracy"] <= CHANCE and evals[-1]["eval_generated_accuracy"] > 0.9
    last = generations[evals[-1]["step"]]
    assert len(last["samples"]) == 32 and set(last["samples"][0]) == {"prompt", "expected", "generated", "correct"}
    assert last["samples"][0]["prompt"] == "what colour is the shape ? answer in french ."
    assert sum(s["correct"] for s in last["samples"]) / 32 == last["accuracy"]
    # before training the base answers in English: the samples show what the model says, not a template
    assert {s["generated"] for s in generations[0]["samples"]} & {"red", "green", "blue", "yellow", "purple", "pink", "white", "black"}

    manifest = json.loads((run_dir / "manifest.json").read_text())
    section = manifest["generation"]
    assert section["max_new_tokens"] == 4
    assert section["trained"]["step"] == manifest["metrics"]["step"] == evals[-1]["step"]
    assert section["trained"]["accuracy"] == manifest["metrics"]["eval_generated_accuracy"] == last["accuracy"]
    merged = section["merged"]
    assert merged == manifest["parity"]["generation"] and merged["ran"] and len(merged["samples"]) == 32
    assert merged["accuracy"] > 0.9 and quickstart_run["merged_generated_accuracy_french"] == merged["accuracy"]


def test_the_merged_model_answers_chat_rows(quickstart_run, tmp_path):
    """The same held-out rows in the chat layout (messages + images columns), answered by the merged model as
    plain transformers loads it."""
    import torch

    from jobs.data import read_table
    from jobs.generate import generate, prompts
    from jobs.model import load_processor, model_class
    from orchestrator.architectures import for_model_dir

    model_dir = Path(quickstart_run["merged_model"])
    rows = read_table(Path(quickstart_run["root"]) / "data/french_eval.parquet").slice(0, 16).to_pylist()
    data = tinymodels.write_chat_parquet([tinymodels.as_chat(r) for r in rows], tmp_path / "chat.parquet")
    arch = for_model_dir(model_dir)
    job = JobConfig.model_validate({"model": str(model_dir), "method": "full", "eval": {"generate": {"samples": 16, "max_new_tokens": 4}},
                                    "data": {"train": str(data), "eval": str(data), "messages": "messages", "images": "images", "max_length": 64}})
    processor = load_processor(str(model_dir), arch)
    result = generate(model_class(arch).from_pretrained(model_dir, dtype=torch.float32), processor, job, prompts(job, processor, arch))
    assert [s["expected"] for s in result["samples"]] == [r["answer"] for r in rows]
    assert result["accuracy"] > 0.9


@pytest.mark.parametrize("stage", [3, None], ids=["zero3", "ddp"])
def test_two_workers_generate_without_hanging(world, ray_local, tmp_path, stage):
    """2 workers. ZeRO-3: parameters are partitioned, so both ranks generate every row (synced_gpus); DDP: rank
    0 alone, on the unwrapped model. Either way every eval has its answers and the run ends; the export's
    check (ZeRO: reload; DDP: end to end) answers the same rows with the merged model."""
    from orchestrator import launch

    raw = {
        "name": "zero3-generate", "model": str(world / "init"), "method": "full", "precision": "fp32", "output": str(tmp_path / "runs"),
        "data": {"train": str(world / "data/english_train.parquet"), "eval": str(world / "data/english_eval.parquet"), "max_length": 64},
        "train": {"max_steps": 4, "micro_batch_size": 8, "lr": 3e-3, "eval_every": 2, "checkpoint_every": 4, "log_every": 1},
        "scaling": {"workers": 2, "cpus_per_worker": 1},
        "eval": {"generate": {"samples": 3, "max_new_tokens": 3}},
        # DDP: full fine-tuning too, where LLaVA's last vision layer gets no gradient (DDP finds unused parameters)
        **({"deepspeed": {"stage": stage}} if stage else {}),
    }
    job, _ = build_job(raw)
    out = launch.train(job, progress=False)
    records = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    generations = [r for r in records if r["event"] == "generations"]
    assert [r["step"] for r in generations] == [2, 4] and all(len(r["samples"]) == 3 for r in generations)
    assert all("eval_generated_accuracy" in r for r in records if r["event"] == "eval")
    assert out.manifest["parity"]["checks"]["reload" if stage else "end_to_end"]["ran"]
    assert out.manifest["generation"]["merged"]["ran"] and len(out.manifest["generation"]["merged"]["samples"]) == 3
    assert out.manifest["generation"]["trained"]["step"] == 4
