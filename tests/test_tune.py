"""`rayft tune`: a Ray Tune search (ASHA) on the quickstart task, through the CLI; its trials of one worker are trained in their own actors."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import RAYFT, REPO, clean_reload_accuracy

from orchestrator.config import ConfigError, load_search


def search_file(quickstart_run, tmp_path: Path, **tune) -> Path:
    """examples/tune.yaml pointed at the session's quickstart tree."""
    body = yaml.safe_load((REPO / "examples" / "tune.yaml").read_text())
    root = Path(quickstart_run["root"])
    body["model"] = str(root / "base")
    body["data"].update(train=str(root / "data/french_train.parquet"), eval=str(root / "data/french_eval.parquet"))
    body["output"] = str(tmp_path / "runs")
    body["tune"].update(tune)
    path = tmp_path / "tune.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def short_trials(path: Path, steps: int) -> None:
    """Trials of `steps` optimizer steps (examples/tune.yaml's: one epoch, 32) with an eval every 8."""
    body = yaml.safe_load(path.read_text())
    body["train"]["max_steps"] = steps
    path.write_text(yaml.safe_dump(body))


def test_space_keys_and_values_are_checked_before_anything_starts(quickstart_run, tmp_path):
    path = search_file(quickstart_run, tmp_path, space={"lora.rnak": {"choice": [4]}, "precision": {"choice": ["bf16", "fp8"]}, "train.lr": {"uniform": [0.1, 0.01]}})
    with pytest.raises(ConfigError) as e:
        load_search(path)
    text = "\n".join(str(p) for p in e.value.problems)
    assert "tune.space.lora.rnak" in text and "did you mean `rank`" in text
    assert "tune.space.precision: value 'fp8'" in text
    assert "low < high" in text


@pytest.fixture(scope="module")
def search(quickstart_run, tmp_path_factory) -> dict:
    """The one ASHA search the tests below read: 4 learning rates, one trial at a time, the first milestone
    after one eval (step 8 of 32): a stop lands while a trial still has steps to run (at the default 5/8,
    step 24, a trial of this size can finish its last 8 steps first)."""
    tmp = tmp_path_factory.mktemp("search")
    t0 = time.time()
    path = search_file(quickstart_run, tmp, num_samples=1, max_concurrent=1, grace_evals=1, space={"train.lr": {"grid": [5e-3, 7e-3, 3e-4, 5e-4]}})
    proc = subprocess.run([RAYFT, "tune", str(path), "--json"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    summary["cli_wall_s"] = time.time() - t0
    return summary


@pytest.mark.slow
def test_asha_stops_a_trial_early(search):
    summary = search
    stopped = [t for t in summary["trials"] if t["status"] == "stopped early"]
    assert stopped and all(t["steps"] < t["total_steps"] for t in stopped)
    # max_concurrent: 1 means one trial at a time: each trial's first file is written after the previous one's last
    trials_dir = Path(summary["best_model"]).parents[1] / "trials"
    spans = sorted(((d / "job.yaml").stat().st_mtime, (d / "metrics.jsonl").stat().st_mtime) for d in trials_dir.iterdir())
    assert len(spans) == 4 and all(start >= prev_end for (_, prev_end), (start, _) in zip(spans, spans[1:], strict=False))


@pytest.mark.slow
def test_the_best_trial_is_the_argmax(search):
    trials = search["trials"]
    assert len(trials) == 4
    assert all(t["status"] in ("finished", "stopped early") for t in trials)
    # recompute from each trial's own metrics.jsonl (a stopped trial's too): the winner holds the highest eval accuracy reported
    search_dir = Path(search["best_model"]).parents[1]
    best_seen = {}
    for t in trials:
        records = [json.loads(x) for x in (search_dir / "trials" / t["trial"] / "metrics.jsonl").read_text().splitlines()]
        best_seen[t["trial"]] = max(r["eval_accuracy"] for r in records if r.get("event") == "eval")
    assert search["best"]["trial"] == max(best_seen, key=best_seen.get)
    assert search["best"]["best_metric"] == max(best_seen.values())
    for name in ("results.csv", "results.md", "metrics.png"):
        assert (search_dir / name).stat().st_size > 0
    assert list((search_dir / "tuner").glob("*/events.out.tfevents.*"))  # TensorBoard logs per trial


@pytest.mark.slow
def test_best_model_reloads_without_peft_and_reproduces_the_best_accuracy(search):
    model_dir = Path(search["best_model"])
    manifest = json.loads((model_dir.parent / "manifest.json").read_text())
    assert len(manifest["search"]["trials"]) == 4 and manifest["parity"]["passed"]
    eval_file = manifest["job"]["data"]["eval"]
    assert abs(clean_reload_accuracy(model_dir, eval_file) - search["best"]["best_metric"]) <= 0.05


@pytest.mark.slow
def test_report_regenerates_the_table_and_plot(search, tmp_path):
    search_dir = tmp_path / "copy"
    shutil.copytree(Path(search["best_model"]).parents[1], search_dir)
    names = ("results.csv", "results.md", "metrics.png", "frontier.png", "frontier.md")
    for name in names:
        (search_dir / name).unlink()
    out = subprocess.run([RAYFT, "report", str(search_dir)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(best)" in out.stdout and "| predicted GiB |" in out.stdout
    for line in (f"plot: {search_dir / 'metrics.png'}", f"frontier: {search_dir / 'frontier.png'}", f"frontier table: {search_dir / 'frontier.md'}"):
        assert line in out.stdout
    assert all((search_dir / name).stat().st_size > 0 for name in names)
    listed = subprocess.run([RAYFT, "report", str(search_dir), "--json"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    files = json.loads(listed.stdout)
    assert files["frontier"] == str(search_dir / "frontier.png") and files["frontier_md"] == str(search_dir / "frontier.md")
    assert files["plot"] == str(search_dir / "metrics.png") and files["results"] == str(search_dir / "results.md")


@pytest.mark.slow
def test_every_trial_records_its_memory_and_the_search_writes_its_frontier(search):
    """memory.json (the planner's prediction, written before the trial launches) in every trial, the
    measured peak from its metrics.jsonl in the summary, and frontier.png / frontier.md in the search."""
    search_dir = Path(search["best_model"]).parents[1]
    for t in search["trials"]:
        saved = json.loads((search_dir / "trials" / t["trial"] / "memory.json").read_text())
        assert saved["device"] in ("cpu", "gpu") and saved["predicted_bytes"] > 0, saved
        memory = t["memory"]
        assert memory["predicted_bytes"] == saved["predicted_bytes"] and memory["measured_bytes"] > 0, memory
        assert memory["measured_kind"] == ("cuda_peak" if saved["device"] == "gpu" else "host_rss")
    assert (search_dir / "frontier.png").stat().st_size > 0
    rows = [line for line in (search_dir / "frontier.md").read_text().splitlines() if line.startswith("| tune_trial_")]
    assert len(rows) == 4
    # every trial has the same predicted memory (only lr is searched): the best one is on the frontier
    best_row = next(r for r in rows if r.startswith(f"| {search['best']['trial']} (best) |"))
    assert best_row.endswith("| yes |") and "lr=" in best_row


@pytest.mark.slow
def test_interrupted_search_resumes_without_redoing_finished_trials(quickstart_run, tmp_path):
    # 3 trials, 2 at a time: the interrupt comes as the first ends, the second is cut short, the third not started
    path = search_file(quickstart_run, tmp_path, num_samples=3, scheduler="fifo")
    short_trials(path, 16)
    proc = subprocess.Popen([RAYFT, "tune", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    finished: list[Path] = []
    while time.time() < deadline and proc.poll() is None:
        ends = [p for p in (tmp_path / "runs").glob("*/trials/*/metrics.jsonl") if '"event": "end"' in p.read_text()]
        if ends:
            finished = [p.parent for p in ends]
            break
        time.sleep(0.5)
    assert finished, "no trial finished in time"
    proc.send_signal(signal.SIGTERM)  # what Kubernetes and Slurm send: handled as Ctrl-C
    _, err = proc.communicate(timeout=180)
    search_dir = finished[0].parents[1]
    assert proc.returncode == 143 and f"stopped by SIGTERM; continue with: rayft tune {path} --resume {search_dir}" in err, err[-3000:]
    trials_before = {p.name for p in (search_dir / "trials").glob("*")}
    resumed = subprocess.run([RAYFT, "tune", str(path), "--resume", str(search_dir), "--json"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout[resumed.stdout.index("{\n") :])
    assert len(summary["trials"]) == 3 and all(t["status"] == "finished" for t in summary["trials"])
    for trial_dir in finished:  # finished before the interrupt: no step trained again
        records = [json.loads(x) for x in (trial_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in records if "train_loss" in r]
        assert len(steps) == len(set(steps)), trial_dir.name
        # Tune may not have registered the trial's end before the interrupt; then it is restored, and
        # resumes from its final checkpoint with nothing left to do
        assert all(r["step"] == r["total_steps"] for r in records[1:] if r.get("event") == "start"), trial_dir.name
    assert trials_before <= {t["trial"] for t in summary["trials"]}
    # the wall time counts both invocations
    assert [i["outcome"] for i in summary["invocations"]] == ["interrupted", "this invocation"]
    assert summary["wall_s"] == round(sum(i["wall_s"] for i in summary["invocations"]), 1) > summary["invocations"][-1]["wall_s"]


@pytest.mark.slow
def test_every_row_is_validated_once_for_the_whole_search(search):
    """The search's driver validates and encodes every row once per data file; every trial reads both back."""
    search_dir = Path(search["best_model"]).parents[1]
    assert len(sorted((search_dir / ".rayft-data").glob("rows-*/index-*.npz"))) == 2  # train and eval
    assert len(sorted((search_dir / ".rayft-data").glob("rows-*/encoded-*/meta.json"))) == 2
    trials = list((search_dir / "trials").iterdir())
    assert len(trials) == 4
    for trial in trials:
        start = next(json.loads(x) for x in (trial / "metrics.jsonl").read_text().splitlines() if '"event": "start"' in x)
        assert start["validation"] == {k: {"cached": True, "nodes": 0, "encoded_once": True} for k in ("train", "eval")}
        assert start["stream"] == "direct"  # the search's Ray is one node, this machine: the workers read the encoded rows themselves
        assert start["runner"] == "tune_trial"  # one worker on one machine: trained in the trial's own actor
