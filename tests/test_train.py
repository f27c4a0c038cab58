"""Training on the real stack (local Ray, peft, bitsandbytes) on the tiny colour task.

The quickstart (run through the CLI, as a user would) trains the base with full fine-tuning from random
init on English answers and QLoRA-NF4-adapts it to French answers; the other methods adapt that base.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import CHANCE, HUB_COMMIT, RAYFT, cache_hub_model, clean_reload_accuracy

pytestmark = pytest.mark.slow


def french_job(quickstart_run, tmp_path: Path, **sets) -> JobConfig:  # noqa: F821
    from orchestrator.config import apply_overrides, build_job, load_raw

    raw = load_raw(Path(quickstart_run["root"]) / "jobs" / "qlora.yaml")
    raw = apply_overrides(raw, {"output": str(tmp_path / "runs"), **sets})
    job, _ = build_job(raw)
    return job


def test_quickstart_full_then_qlora(quickstart_run):
    s = quickstart_run
    # full fine-tuning from random init: chance or below -> far above
    assert s["base_accuracy_english"] > 0.9
    # QLoRA NF4 to a vocabulary the base never produced: 0 -> far above
    assert s["before_accuracy_french"] <= CHANCE
    assert s["after_accuracy_french"] > 0.9
    assert s["sample"]["merged_model_answer"] == s["sample"]["expected"]
    # 80 s measured on an idle 2-core machine; the bound leaves room for a loaded CI machine (the timing itself
    # is measured in bench/, not here)
    assert s["wall_s"] < 360, "quickstart should finish in under 6 minutes on 2 cores"


def test_quickstart_merged_model_reloads_without_peft_or_bitsandbytes(quickstart_run):
    model_dir = Path(quickstart_run["merged_model"])
    manifest = json.loads((model_dir.parent / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["passed"] and parity["merge"] == "streamed"
    assert parity["checks"]["layers"]["passed"] and parity["checks"]["layers"]["layers"] > 0
    e2e = parity["checks"]["end_to_end"]  # the tiny model fits: the logits check ran too
    assert e2e["ran"] and e2e["max_abs_logit_diff"] <= e2e["tolerance"]
    assert manifest["job"]["quantization"] == {"type": "nf4", "double_quant": True}
    assert {"torch", "transformers", "peft", "bitsandbytes", "ray"} <= set(manifest["versions"])
    eval_file = manifest["job"]["data"]["eval"]
    accuracy = clean_reload_accuracy(model_dir, eval_file)
    assert accuracy > 0.9
    assert abs(accuracy - manifest["metrics"]["eval_accuracy"]) <= 0.05


def test_parity_compares_the_logits_that_predict_answers():
    """The export's parity check reads the positions whose next token is an answer token (what decoding
    uses); a prompt position's logits may drift, an answer position's may not."""
    import torch

    from jobs.merge import parity_diff

    labels = torch.tensor([[-100, -100, -100, 5, 6]])  # positions 2 and 3 predict the answer tokens 5, 6
    ref = torch.randn(1, 5, 10)
    got = ref.clone()
    got[0, 0] += 3.0  # predicts a prompt token
    got[0, 4] += 3.0  # predicts past the end
    assert parity_diff(got, ref, labels)[0] == 0.0
    got[0, 2, 7] += 0.5
    diff, scale = parity_diff(got, ref, labels)
    assert abs(diff - 0.5) < 1e-6 and scale == float(ref[0, 2:4].abs().max())


def test_merged_logits_equal_adapter_on_4bit_base(quickstart_run):
    """Independently of the export's own check: the adapter over the 4-bit base (as trained) and the merged
    model give the same answers and logits within bf16 noise."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from jobs.checkpoint import WEIGHTS_FILE
    from jobs.data import collate, encode_rows
    from jobs.model import build_model, load_processor, load_trainable_state
    from orchestrator import architectures
    from orchestrator.config import JobConfig

    run_dir = Path(quickstart_run["merged_model"]).parent
    manifest = json.loads((run_dir / "manifest.json").read_text())
    job = JobConfig.model_validate(manifest["job"])
    arch = architectures.for_model_dir(job.model)
    adapter = build_model(job, arch, torch.device("cpu"))
    load_trainable_state(adapter, load_file(Path(manifest["checkpoint"]) / WEIGHTS_FILE))
    merged = AutoModelForImageTextToText.from_pretrained(run_dir / "model", dtype=torch.float32)
    processor = load_processor(job.model, arch)
    rows, _ = encode_rows(job.data.eval, job.data, processor, True, list(range(32)))
    batch = collate(rows, processor.tokenizer.pad_token_id)
    labels = batch.pop("labels")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = adapter.eval()(**batch).logits.float()
        m = merged.eval()(**batch).logits.float()
    answer = labels[:, 1:] != -100
    assert torch.equal(a[:, :-1].argmax(-1)[answer], m[:, :-1].argmax(-1)[answer])
    assert float((a - m).abs().max()) <= 0.05 * float(a.abs().max())


@pytest.mark.parametrize(("method", "quant"), [("lora", "none"), ("qlora", "fp4")])
def test_adapters_learn_and_export(quickstart_run, ray_local, tmp_path, method, quant):
    """The lora run names its base by hub id (acme/colours-base, in the tests' Hugging Face cache, offline):
    the run's job.yaml and manifest record the commit main resolved to, the workers and the export read that
    snapshot, and `rayft merge` of the run reads it again."""
    from click.testing import CliRunner

    from orchestrator import launch
    from orchestrator.cli import main
    from orchestrator.config import load_raw

    hub = method == "lora"
    sets = {"model": "acme/colours-base"} if hub else {}
    snapshot = cache_hub_model("acme/colours-base", Path(quickstart_run["root"]) / "base") if hub else None
    job = french_job(quickstart_run, tmp_path, method=method, **{"quantization.type": quant, "quantization.double_quant": False}, **sets)
    out = launch.train(job, progress=False)
    if hub:
        assert out.manifest["base_model"] == {"model": "acme/colours-base", "revision": HUB_COMMIT, "files": str(snapshot)}
        assert load_raw(out.run_dir / "job.yaml")["model_revision"] == HUB_COMMIT
        merged = CliRunner().invoke(main, ["merge", str(out.run_dir), "--json"], catch_exceptions=False)
        assert merged.exit_code == 0, merged.output
        assert json.loads(merged.stdout)["parity"]["passed"]
    m = out.manifest["metrics"]
    assert m["initial_eval_accuracy"] <= CHANCE and m["eval_accuracy"] > 0.9
    assert out.manifest["parity"]["passed"]
    assert 0 < out.manifest["trainable_params"] < 0.25 * out.manifest["total_params"]
    records = [json.loads(x) for x in (out.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(r["tokens_per_s"] > 0 for r in records if "tokens_per_s" in r)
    # the manifest's timings: contiguous spans (driver and worker stamps) that add up to the wall time
    t = out.manifest["timings"]
    assert abs(sum(t[name] for name, _, _ in launch.SPANS) - t["wall_s"]) < 0.01
    assert 0 < t["first_step_s"] <= t["steps_s"] < t["wall_s"] and t["start_to_first_step_s"] < t["wall_s"]
    assert (out.run_dir / "job.yaml").is_file() and (out.run_dir / "ray.log").is_file()
    assert clean_reload_accuracy(out.model_dir, job.data.eval) > 0.9


def test_blind_control_stays_near_chance(quickstart_run, ray_local, tmp_path):
    """Same QLoRA job with every image zeroed: the answer depends on the image, so accuracy stays near chance."""
    from orchestrator import launch

    out = launch.train(french_job(quickstart_run, tmp_path, **{"data.blind": True}), progress=False)
    assert out.manifest["metrics"]["eval_accuracy"] <= 2.5 * CHANCE


def test_interrupted_run_resumes_from_its_checkpoint(quickstart_run, tmp_path):
    """Ctrl-C a `rayft train` after its first checkpoint; `--resume` continues from that step, not from 0."""
    job_file = Path(quickstart_run["root"]) / "jobs" / "qlora.yaml"
    # 128 steps: the interrupt lands right after the step-8 checkpoint registers, well before the last step
    sets = ["--set", f"output={tmp_path / 'runs'}", "--set", "train.checkpoint_every=8", "--set", "train.eval_every=64", "--set", "train.epochs=4"]
    proc = subprocess.Popen([RAYFT, "train", str(job_file), *sets, "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    snapshot = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs").glob("*/checkpoints/checkpoint_manager_snapshot.json"))
        if found and "checkpoint_" in found[0].read_text():
            snapshot = found[0]
            break
        time.sleep(0.5)
    assert snapshot is not None, "no checkpoint registered in time"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    run_dir = snapshot.parents[1]
    assert f"--resume {run_dir}" in err
    first = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    reached = max(r["step"] for r in first)
    assert reached < 128, "the run finished before the interrupt"

    resumed = subprocess.run([RAYFT, "train", str(job_file), *sets, "--no-progress", "--resume", str(run_dir)], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "start"]
    # Ctrl-C stops after the current step with a checkpoint of it (not of the every-32 cadence)
    stopped = next(r for r in first if r.get("event") == "stopped")
    assert stopped["reason"] == "SIGINT received" and f"the newest checkpoint is of step {stopped['step']}" in err
    assert len(starts) == 2 and starts[1]["step"] == stopped["step"] and 8 <= stopped["step"] <= reached
    after = records[records.index(starts[1]) + 1 :]
    assert min(r["step"] for r in after) > starts[1]["step"]
    assert max(r["step"] for r in after) == 128
    assert (run_dir / "model" / "config.json").is_file()
    assert json.loads((run_dir / "manifest.json").read_text())["metrics"]["eval_accuracy"] > 0.9


def test_merge_reexports_from_any_checkpoint(quickstart_run, tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main

    run_dir = tmp_path / "run"
    shutil.copytree(Path(quickstart_run["merged_model"]).parent, run_dir)
    checkpoints = sorted((p.parent for p in (run_dir / "checkpoints").rglob("weights.safetensors")), key=lambda p: p.name)
    assert len(checkpoints) == 2  # keep_checkpoints: 2
    result = CliRunner().invoke(main, ["merge", str(run_dir), "--checkpoint", str(checkpoints[0]), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    manifest = json.loads(result.stdout)
    assert manifest["checkpoint"] == str(checkpoints[0].resolve()) and manifest["metrics"]["step"] == 32
    assert manifest["parity"]["passed"] and (run_dir / "model" / "model.safetensors").is_file()
    assert not (run_dir / "model.partial").exists()
    newest = CliRunner().invoke(main, ["merge", str(run_dir)], catch_exceptions=False)
    assert newest.exit_code == 0 and "merged model:" in newest.output
    assert json.loads((run_dir / "manifest.json").read_text())["metrics"]["step"] == 64


def test_row_too_long_fails_before_training_naming_the_row(quickstart_run, ray_local, tmp_path):
    """Found by the validation pass (Ray Data), before any worker starts: exit 2's DataError, no run directory."""
    from jobs.data import DataError
    from orchestrator import launch

    job = french_job(quickstart_run, tmp_path, **{"data.max_length": 20})
    with pytest.raises(DataError) as e:
        launch.train(job, progress=False)
    assert "longer than data.max_length=20" in str(e.value) and "row 0" in str(e.value) and "(data.train)" in str(e.value)
    assert not [p for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")]


def test_checkpoints_kept_outside_ray_train_are_whole_and_pruned_as_ray_trains_are(tmp_path):
    """A trial trained in Tune's own actor stores its checkpoints itself (jobs/checkpoint.store, prune): a copy cut
    short never counts as a checkpoint, and train.keep_checkpoints keeps the best by the search's metric plus the
    newest (the one a restart continues from), as Ray Train's CheckpointConfig does."""
    from jobs import checkpoint

    run_dir = tmp_path / "trial"
    for step, accuracy in ((8, 0.5), (16, 0.9), (24, 0.7), (32, 0.6)):
        staged = tmp_path / f"staged-{step}"
        staged.mkdir()
        (staged / checkpoint.META_FILE).write_text(json.dumps({"step": step, "eval_accuracy": accuracy}))
        checkpoint.store(run_dir, str(staged), step)
        checkpoint.prune(run_dir, 2, "eval_accuracy:max")
    assert sorted(checkpoint.kept_checkpoints(run_dir)) == [16, 24, 32]  # the best two, and the newest
    assert checkpoint.newest(run_dir) == run_dir / "checkpoints" / "checkpoint_000032"
    assert checkpoint.prune(run_dir, 1, "eval_accuracy:min") == [16, 24]
    assert checkpoint.prune(run_dir, None, None) == []
    (run_dir / "checkpoints" / ".partial_000040").mkdir()  # a copy killed halfway: not a checkpoint
    assert checkpoint.newest(run_dir).name == "checkpoint_000032"
