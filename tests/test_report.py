"""`rayft report` on a run directory, and the report every `rayft train` writes: RUN_DIR/report.png (a panel
per metric, one colour per attempt) and RUN_DIR/report.md. Synthetic run directories need no training; one
real `rayft train` checks the command prints the report it wrote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import RAYFT

from orchestrator import run_report

T0 = 1_700_000_000.0
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # attempts 1 and 2


def _train(attempt: int, step: int, loss: float, t: float) -> dict:
    lr = 1e-3 * min(1.0, step / 4) * (1 - step / 20)
    return {"event": "train", "attempt": attempt, "step": step, "train_loss": loss, "lr": lr, "tokens_per_s": 900.0 + 10 * step,
            "samples_per_s": 30.0, "time": t}


def _records(generated: bool = True) -> list[dict]:
    """Attempt 1 reaches step 11 and dies (last checkpoint at step 8); attempt 2 takes over at 8 and ends at 16."""
    recs: list[dict] = [{"event": "start", "attempt": 1, "step": 0, "previous_reached": 0, "total_steps": 16, "time": T0},
                        {"event": "eval", "attempt": 1, "step": 0, "eval_loss": 2.2, "eval_accuracy": 0.0, "time": T0}]
    for s in range(1, 12):
        rec = _train(1, s, 2.0 - 0.1 * s, T0 + s)
        if s in (4, 8):
            rec |= {"event": "eval", "eval_loss": 2.1 - 0.1 * s, "eval_accuracy": 0.05 * s}
            if generated:
                rec["eval_generated_accuracy"] = 0.04 * s
        recs.append(rec)
    t1 = T0 + 100
    recs.append({"event": "start", "attempt": 2, "step": 8, "previous_reached": 11, "total_steps": 16, "time": t1})
    for s in range(9, 17):
        rec = _train(2, s, 1.3 - 0.05 * s, t1 + s)
        if s in (12, 16):
            rec |= {"event": "eval", "eval_loss": 1.4 - 0.05 * s, "eval_accuracy": 0.05 * s}
            if generated:
                rec["eval_generated_accuracy"] = 0.045 * s
        recs.append(rec)
    recs.append({"event": "end", "attempt": 2, "step": 16, "time": t1 + 20})
    return recs


JOB_YAML = """name: synthetic
model: /models/tiny-vlm
method: qlora
lora: {rank: 8, alpha: 16.0}
quantization: {type: nf4, double_quant: true}
precision: bf16
train: {epochs: 2, lr: 0.0002}
scaling: {workers: 2}
deepspeed: null
"""


def _run_dir(root: Path, records: list[dict], failure: bool = True) -> Path:
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text(JOB_YAML)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if failure:
        (run_dir / "failures.jsonl").write_text(json.dumps({"attempt": 1, "time": T0 + 12, "reason": "worker 1 was lost: its process died"}) + "\n")
    return run_dir


def _manifest(run_dir: Path) -> dict:
    layers = {"name": "layers", "ran": True, "layers": 14, "max_rel_diff": 0.0024, "worst_layer": "layers.0.q_proj.weight",
              "tolerance": 0.015, "failed": [], "passed": True}
    sample = {"prompt": "<image>\nWhat colour | shade is it?", "expected": "rouge", "generated": "rouge\nfin", "correct": True}
    manifest = {
        "name": "synthetic", "method": "qlora", "model_dir": str(run_dir / "model"),
        "metrics": {"step": 16, "eval_accuracy": 0.8125, "eval_loss": 0.6543, "train_loss": 0.5012, "initial_eval_accuracy": 0.125,
                    "tokens_per_s": 1234.5, "eval_generated_accuracy": 0.75},
        "parity": {"merge": "streamed", "export_dtype": "bf16", "passed": True, "merged_accuracy": 0.8125,
                   "checks": {"layers": layers, "end_to_end": {"ran": False, "reason": "export.parity_memory is 0"}}},
        "timings": {"ray_init_s": 3.123, "training_s": 31.5, "wall_s": 65.957},
        "generation": {"max_new_tokens": 8,
                       "trained": {"step": 16, "accuracy": 0.75, "samples": [sample, {**sample, "generated": "bleu", "correct": False}]},
                       "merged": {"ran": False, "reason": "the export failed its parity check"}},
    }  # no "job" key (an older manifest): the config comes from job.yaml
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _panel_colours(png: Path) -> dict[str, set[tuple[int, int, int]]]:
    """The colours inside each panel's plot box."""
    from PIL import Image

    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == run_report.SIZE
        rgb = img.convert("RGB")
        return {name: {c for _, c in rgb.crop(box).getcolors(maxcolors=1 << 20)} for name, box in run_report.panel_boxes().items()}


def test_report_of_a_run_directory_draws_every_metric_and_lists_every_attempt(tmp_path):
    run_dir = _run_dir(tmp_path, _records())
    _manifest(run_dir)
    out = subprocess.run([RAYFT, "report", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    png, md = run_dir / "report.png", run_dir / "report.md"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    colours = _panel_colours(png)
    for key, _, _ in run_report.PANELS:  # each attempt drawn in every panel, in its own colour
        assert BLUE in colours[key] and ORANGE in colours[key], key
    assert BLUE in colours["legend"] and ORANGE in colours["legend"]
    lines = out.stdout.splitlines()
    assert lines[0].split()[:2] == ["attempt", "steps"]
    first = next(line for line in lines if line.startswith("1 "))
    second = next(line for line in lines if line.startswith("2 "))
    assert "0-11" in first and "worker 1 was lost" in first
    assert "8-16" in second and "completed" in second
    assert f"report: {md}" in out.stdout and f"plot: {png}" in out.stdout

    as_json = subprocess.run([RAYFT, "report", str(run_dir), "--json"], capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    summary = json.loads(as_json.stdout)
    assert summary["report"] == str(md) and summary["report_png"] == str(png)
    assert [(a["attempt"], a["from_step"], a["to_step"]) for a in summary["attempts"]] == [(1, 0, 11), (2, 8, 16)]


def test_report_md_holds_the_config_metrics_parity_timings_attempts_and_generations(tmp_path):
    run_dir = _run_dir(tmp_path, _records())
    _manifest(run_dir)
    png, md = run_report.write_run_report(run_dir)
    assert png == run_dir / "report.png" and png.is_file()
    text = md.read_text()
    for section in ("# Run report: synthetic", "## Config", "## Final metrics", "## Parity", "## Timings", "## Attempts", "## Sample generations"):
        assert section in text, section
    assert "](report.png)" in text  # the plot, linked relative to the markdown
    for row in ("| method | qlora |", "| precision | bf16 |", "| quantization | nf4, double quant |", "| lora | rank 8, alpha 16.0 |",
                "| lr | 0.0002 |", "| epochs | 2 |", "| workers | 2 |", "| deepspeed | off |", "| model | /models/tiny-vlm |"):
        assert row in text, row
    for row in ("| eval accuracy (teacher-forced) | 81.2% |", "| eval accuracy (generated) | 75.0% |", "| eval loss | 0.6543 |",
                "| train loss | 0.5012 |", "| eval accuracy before training (step 0) | 12.5% |", "| tokens/s (median over steps) | 1,234 |"):
        assert row in text, row
    assert "- passed: yes" in text and "- merge: streamed" in text and "- export dtype: bf16" in text
    assert "| layers | yes | 14 merged layers, max relative probe difference 0.0024" in text
    assert "| end_to_end | no | not run (export.parity_memory is 0) |" in text
    assert "| wall_s | 65.957 |" in text and "| training_s | 31.5 |" in text
    assert "| 1 | 0-11 | " in text and "worker 1 was lost" in text and "| 2 | 8-16 | " in text
    # sample generations: cells escaped so that each row keeps its four columns
    assert "**As trained** (step 16): generated accuracy 75.0%" in text
    assert "| &lt;image&gt;<br>What colour \\| shade is it? | rouge | rouge<br>fin | yes |" in text
    assert "| bleu | no |" in text
    assert "**Merged model**: not run (the export failed its parity check)" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert all(line.replace("\\|", "").count("|") in (3, 4, 5) for line in rows)


def test_a_run_without_a_manifest_is_reported_from_its_metrics_saying_there_is_no_export(tmp_path):
    records = [r for r in _records(generated=False) if r.get("attempt") == 1]  # died at step 11, never exported
    run_dir = _run_dir(tmp_path, records)
    out = subprocess.run([RAYFT, "report", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    text = (run_dir / "report.md").read_text()
    assert "**No export**" in text and "reached step 11 of 16" in text and "--resume" in text
    assert "the last recorded (metrics.jsonl; nothing exported)" in text
    assert "| eval accuracy (teacher-forced) | 40.0% |" in text and "| eval loss | 1.3000 |" in text  # the step-8 eval
    assert "| train loss | 0.9000 |" in text and "| eval accuracy before training (step 0) | 0.0% |" in text
    assert "eval accuracy (generated)" not in text and "## Sample generations" not in text and "## Timings" not in text
    assert "No export, so no parity check." in text
    assert "| lora | rank 8, alpha 16.0 |" in text  # the config from job.yaml
    colours = _panel_colours(run_dir / "report.png")
    assert all(BLUE in colours[key] and ORANGE not in colours[key] for key, _, _ in run_report.PANELS)


def test_a_run_without_evals_draws_its_train_panels_and_says_what_was_not_recorded(tmp_path):
    records = [r for r in _records() if r.get("event") != "eval"]
    run_dir = _run_dir(tmp_path, records, failure=False)
    run_report.write_run_report(run_dir)
    colours = _panel_colours(run_dir / "report.png")
    for key in ("train_loss", "lr", "tokens_per_s"):
        assert BLUE in colours[key] and ORANGE in colours[key], key
    for key in ("eval_loss", "eval_accuracy"):
        assert BLUE not in colours[key] and ORANGE not in colours[key], key
    assert "| eval accuracy (teacher-forced) | — |" in (run_dir / "report.md").read_text()


def test_older_records_without_attempt_numbers_count_each_start():
    records = [{k: v for k, v in r.items() if k != "attempt"} for r in _records()]
    by = run_report.split_by_attempt(records)
    assert sorted(by) == [1, 2]
    assert max(r["step"] for r in by[1]) == 11 and min(r["step"] for r in by[2]) == 8
    table = run_report.attempt_table(Path("/nonexistent"), records)
    assert [(a["attempt"], a["from_step"], a["to_step"]) for a in table] == [(1, 0, 11), (2, 8, 16)]


def test_ticks_are_round_numbers_that_cover_the_values():
    assert run_report.nice_ticks(0, 640) == [0, 200, 400, 600, 800]
    assert run_report.nice_ticks(1.08, 4.54) == [1, 2, 3, 4, 5] and run_report.nice_ticks(1.44, 3.64) == pytest.approx([1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    assert run_report.tick_label(1.5e-4, 5e-5) == "1.5e-4"
    assert [run_report.tick_label(v, 5e-5) for v in (0.0, 5e-5, 2e-4)] == ["0", "5e-5", "2e-4"]
    assert [run_report.tick_label(v, 5000, top=25_000) for v in (5000, 25_000)] == ["5k", "25k"]
    assert run_report.tick_label(0.25, 0.25) == "0.25" and run_report.tick_label(0.5, 0.2, percent=True) == "50%"


def test_report_refuses_what_is_neither_kind_of_directory(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    for target in (plain, afile, tmp_path / "missing"):
        out = subprocess.run([RAYFT, "report", str(target)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "search directory" in out.stderr and "run directory" in out.stderr, out.stderr


@pytest.mark.slow
def test_rayft_train_writes_the_report_and_prints_its_path(world, tmp_path):
    sets = {"output": tmp_path / "runs", "train.max_steps": 8, "train.eval_every": 4, "train.checkpoint_every": 8, "train.log_every": 1}
    args = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    out = subprocess.run([RAYFT, "train", str(world / "jobs" / "base.yaml"), *args, "--no-progress"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir = Path(next(line for line in out.stdout.splitlines() if line.startswith("run directory:")).split(": ", 1)[1])
    md = run_dir / "report.md"
    assert f"report: {md}" in out.stdout and md.is_file()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    text = md.read_text()
    assert f"| eval accuracy (teacher-forced) | {manifest['metrics']['eval_accuracy']:.1%} |" in text
    assert "| method | full |" in text and "| 1 | 0-8 | " in text and "- passed: yes" in text
    colours = _panel_colours(run_dir / "report.png")
    assert all(BLUE in colours[key] for key, _, _ in run_report.PANELS)
