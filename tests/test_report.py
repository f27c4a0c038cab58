"""`rayft report` on a run directory: a table of attempts and one curve per attempt; no training needed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from conftest import RAYFT

from orchestrator import run_report

T0 = 1_700_000_000.0


def _records() -> list[dict]:
    """Attempt 1 reaches step 11 and dies (last checkpoint at step 8); attempt 2 takes over at 8 and ends at 16."""
    recs: list[dict] = [{"event": "start", "attempt": 1, "step": 0, "previous_reached": 0, "total_steps": 16, "time": T0}]
    for s in range(1, 12):
        recs.append({"attempt": 1, "step": s, "train_loss": 2.0 - 0.1 * s, "time": T0 + s})
        if s in (4, 8):
            recs.append({"event": "eval", "attempt": 1, "step": s, "eval_loss": 2.1 - 0.1 * s, "eval_accuracy": 0.05 * s, "time": T0 + s})
    t1 = T0 + 100
    recs.append({"event": "start", "attempt": 2, "step": 8, "previous_reached": 11, "total_steps": 16, "time": t1})
    for s in range(9, 17):
        recs.append({"attempt": 2, "step": s, "train_loss": 1.3 - 0.05 * s, "time": t1 + s})
        if s in (12, 16):
            recs.append({"event": "eval", "attempt": 2, "step": s, "eval_loss": 1.4 - 0.05 * s, "eval_accuracy": 0.05 * s, "time": t1 + s})
    recs.append({"event": "end", "attempt": 2, "step": 16, "time": t1 + 20})
    return recs


def _run_dir(root: Path, records: list[dict]) -> Path:
    run_dir = root / "run"
    run_dir.mkdir()
    (run_dir / "job.yaml").write_text("name: synthetic\n")
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "failures.jsonl").write_text(json.dumps({"attempt": 1, "time": T0 + 12, "reason": "worker 1 was lost: its process died"}) + "\n")
    return run_dir


def test_report_of_a_run_directory_draws_and_lists_every_attempt(tmp_path):
    run_dir = _run_dir(tmp_path, _records())
    out = subprocess.run([RAYFT, "report", str(run_dir)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    png = run_dir / "metrics.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    from PIL import Image

    with Image.open(png) as img:
        width, height = img.size
        assert width >= 600 and height >= 400
        colours = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    assert (0x1F, 0x77, 0xB4) in colours and (0xFF, 0x7F, 0x0E) in colours  # one colour per attempt
    lines = out.stdout.splitlines()
    assert lines[0].split()[:2] == ["attempt", "steps"]
    first = next(line for line in lines if line.startswith("1 "))
    second = next(line for line in lines if line.startswith("2 "))
    assert "0-11" in first and "worker 1 was lost" in first
    assert "8-16" in second and "completed" in second
    assert f"plot: {png}" in out.stdout


def test_older_records_without_attempt_numbers_count_each_start():
    records = [{k: v for k, v in r.items() if k != "attempt"} for r in _records()]
    by = run_report.split_by_attempt(records)
    assert sorted(by) == [1, 2]
    assert max(r["step"] for r in by[1]) == 11 and min(r["step"] for r in by[2]) == 8
    table = run_report.attempt_table(Path("/nonexistent"), records)
    assert [(a["attempt"], a["from_step"], a["to_step"]) for a in table] == [(1, 0, 11), (2, 8, 16)]


def test_report_refuses_what_is_neither_kind_of_directory(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    for target in (plain, afile, tmp_path / "missing"):
        out = subprocess.run([RAYFT, "report", str(target)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2, out.stderr
        assert "search directory" in out.stderr and "run directory" in out.stderr, out.stderr
