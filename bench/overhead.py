"""Orchestration overhead of `rayft train`: start -> first optimizer step, where the rest of the wall time
goes, and (wall - summed optimizer-step time) / wall.

    scripts/netns.sh .venv/bin/python bench/overhead.py [QUICKSTART_DIR] [--rounds 3] [--long]

Each round runs `rayft train` as a subprocess through the CLI (embedded local Ray) on the quickstart's
QLoRA French job for 1 epoch (32 steps), then the floor: the same set-up and one optimizer step with
rayft's own functions in a plain Python process, no Ray (`--floor`), and Ray Train's own floor: the same embedded
Ray (rayft's ensure_local_ray) and a TorchTrainer of one worker whose train function does nothing but note the
time (`--ray-floor`). They alternate (A B C A B C); medians.
The breakdown comes from the run's manifest (`timings`: the driver's and the worker's wall-clock
stamps); start -> first step is also measured from outside, from just before the subprocess starts.
`--long` adds one run of about 10 minutes of optimizer steps (sized from the fastest short run's step rate;
eval and checkpoint every 2000 steps) for the overhead of a long run. Results: bench/results/overhead.json.

    scripts/netns.sh .venv/bin/python bench/overhead.py [QUICKSTART_DIR] --rows 1000 50000 --before REV

compares each span of `rayft train` at two data sizes, this tree against an earlier commit REV (checked out in a
git worktree and run from there, PYTHONPATH first; Ray's processes inherit it): the QLoRA job on N colour rows,
one epoch at 1,000 rows, 32 steps at larger sizes (start -> first step and the first steps, not an epoch).
Runs alternate (before, after) per size. Results: bench/results/overhead_sizes_<sizes>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, alternate, write_result

RAYFT = str(Path(sys.executable).parent / "rayft")
SHORT = ["train.epochs=1"]
LONG_SECONDS = 600
# The manifest's spans (orchestrator/launch/record.py SPANS), what each holds, and whose cost it is: "ray" (Ray and the
# driver's Ray Train import), "work" (what a plain process does too: imports, data, model, steps), "rayft"
# (what rayft adds: CLI, preflight, the step-0 eval, the merged export).
BREAKDOWN = (
    ("startup_s", "rayft", "CLI start-up: interpreter, imports, job file, fit check"),
    ("preflight_s", "rayft", "run directory (the preflight runs on a thread while Ray starts)"),
    ("ray_init_s", "ray", "Ray start (ray.init)"),
    ("validation_s", "rayft", "every row checked (what is left after Ray is up, for a small file)"),
    ("encode_once_s", "rayft", "every row encoded once"),
    ("trainer_build_s", "ray", "driver imports ray.train + torch, builds the TorchTrainer"),
    ("worker_start_s", "ray", "worker start: Ray Train controller, placement group, worker process"),
    ("data_s", "work", "data: worker imports, processor, rows encoded"),
    ("model_s", "work", "model load: 4-bit base, adapters, optimizer"),
    ("initial_eval_s", "rayft", "first batches streamed (+ the step-0 eval with eval.at_start)"),
    ("first_step_s", "work", "first optimizer step"),
    ("training_s", "work", "the other steps, evals, checkpoints"),
    ("fit_teardown_s", "ray", "worker end -> fit() returns"),
    ("export_s", "rayft", "export: merge, save, reload, parity check"),
    ("ray_shutdown_s", "ray", "ray.shutdown"),
)


def print_breakdown(t: dict[str, float]) -> None:
    print(f"{'span':<18} {'seconds':>8}  {'whose':<6} what")
    for key, whose, what in BREAKDOWN:
        print(f"{key:<18} {t.get(key, float('nan')):>8.2f}  {whose:<6} {what}")
    for whose in ("ray", "rayft", "work"):
        print(f"  {whose}: {sum(t.get(k, 0.0) for k, w, _ in BREAKDOWN if w == whose):.2f} s")


def rayft_train(job_file: Path, out: Path, sets: list[str], code: Path | None = None) -> dict[str, float]:
    """One `rayft train` subprocess; its manifest's timings plus start -> first step seen from outside.
    code: run rayft from that source tree (a worktree of an earlier commit) instead of this one."""
    args = [RAYFT, "train", str(job_file), "--no-progress", "--set", f"output={out}"]
    for s in sets:
        args += ["--set", s]
    # Ray's worker processes put the driver's working directory first on their path: run from `code` too
    env = {**os.environ, "PYTHONPATH": str(code)} if code else None
    launched = time.time()
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=code)
    wall = time.time() - launched
    if proc.returncode != 0:
        raise SystemExit(f"rayft train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    run_dir = Path(next(line.split(":", 1)[1].strip() for line in proc.stdout.splitlines() if line.startswith("run directory:")))
    timings = json.loads((run_dir / "manifest.json").read_text())["timings"]
    from jobs.metrics_log import read_metrics

    records = read_metrics(run_dir)
    first = next(r for r in records if r.get("event") == "first_step")
    return {**timings, "outside_first_step_s": first["time"] - launched, "outside_wall_s": wall}


def measured_child(args: list[str], ready_stamp: str) -> dict[str, float]:
    """Run this script with `args` (a `--floor` or `--ray-floor` child) and read the stamps it prints as its
    last line: its spans, and process launch -> its `ready_stamp` seen from outside."""
    launched = time.time()
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"outside_first_step_s": done[ready_stamp] - launched, **{k: v for k, v in done.items() if k.endswith("_s")}}


def floor(job_file: Path, out: Path) -> dict[str, float]:
    """The same set-up and one optimizer step, in a plain process (`--floor`)."""
    return measured_child(["--floor", str(job_file), str(out)], "first_step_done")


def floor_main(job_file: str, out: str) -> None:
    """What a worker does before its first step (processor, rows encoded, model, optimizer, one step), with
    rayft's functions and the worker's thread count, no Ray. Prints the wall-clock stamps as JSON."""
    from orchestrator.launch import process_started

    stamps = {"started": process_started()}
    import torch

    from jobs import data as data_mod
    from jobs.model import build_model, load_processor, torch_dtype
    from orchestrator import architectures
    from orchestrator.config import load_job

    job, _ = load_job(job_file, [f"output={out}", *SHORT])
    torch.set_num_threads(2)
    arch = architectures.for_model_dir(job.model)
    stamps["imported"] = time.time()
    processor = load_processor(job.model, arch)
    rows, _ = data_mod.encode_rows(job.data.train, job.data, processor, True)
    assert job.data.eval is not None
    data_mod.encode_rows(job.data.eval, job.data, processor, True)
    stamps["data_encoded"] = time.time()
    model = build_model(job, arch, torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=job.train.lr)
    stamps["model_loaded"] = time.time()
    model.train()
    pad_id = processor.tokenizer.pad_token_id or 0
    with torch.autocast("cpu", dtype=torch_dtype(job.precision)):
        loss = model(**data_mod.collate(rows[: job.train.micro_batch_size], pad_id)).loss
    loss.backward()
    optimizer.step()
    stamps["first_step_done"] = time.time()
    spans = {"imports_s": ("started", "imported"), "data_s": ("imported", "data_encoded"), "model_s": ("data_encoded", "model_loaded"), "first_step_s": ("model_loaded", "first_step_done")}
    result = {name: stamps[b] - stamps[a] for name, (a, b) in spans.items()}
    result["start_to_first_step_s"] = stamps["first_step_done"] - stamps["started"]
    print(json.dumps({**stamps, **result}))


def ray_floor(out: Path) -> dict[str, float]:
    """Ray Train's own start-up on this machine (`--ray-floor`): process start -> a no-op train function runs."""
    return measured_child(["--ray-floor", str(out)], "fn_started")


def _note_time(config: dict[str, Any]) -> None:
    Path(config["path"]).write_text(str(time.time()))


def ray_floor_main(out: str) -> None:
    """rayft's embedded Ray and a one-worker TorchTrainer (the worker holds every core, as rayft's does) whose
    train function only writes the time. Prints the wall-clock stamps as JSON."""
    from orchestrator.launch import ensure_local_ray, process_started

    stamps = {"started": process_started()}
    import ray

    cores = os.cpu_count() or 1
    ensure_local_ray(cores)
    stamps["ray_ready"] = time.time()
    import ray.train
    import ray.train.torch

    path = Path(out) / f"fn-started-{os.getpid()}"
    trainer = ray.train.torch.TorchTrainer(
        _note_time,
        train_loop_config={"path": str(path)},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=False, resources_per_worker={"CPU": cores}),
        run_config=ray.train.RunConfig(storage_path=str(Path(out) / "ray-floor"), name=f"noop-{os.getpid()}"),
    )
    stamps["trainer_built"] = time.time()
    trainer.fit()
    stamps["fit_returned"] = time.time()
    ray.shutdown()
    stamps["finished"] = time.time()
    stamps["fn_started"] = float(path.read_text())
    spans = {
        "ray_init_s": ("started", "ray_ready"),
        "trainer_build_s": ("ray_ready", "trainer_built"),
        "worker_start_s": ("trainer_built", "fn_started"),
        "fit_teardown_s": ("fn_started", "fit_returned"),
        "ray_shutdown_s": ("fit_returned", "finished"),
    }
    result = {name: stamps[b] - stamps[a] for name, (a, b) in spans.items()}
    result["start_to_fn_s"] = stamps["fn_started"] - stamps["started"]
    print(json.dumps({**stamps, **result}))


SIZE_SPANS = ("preflight_s", "ray_init_s", "validation_s", "encode_once_s", "trainer_build_s", "worker_start_s", "data_s",
              "model_s", "initial_eval_s", "first_step_s", "start_to_first_step_s", "steps_s", "training_s", "wall_s")
RAYS_OWN = ("ray_init_s", "worker_start_s")  # Ray's (ray.init, Ray Train's controller and worker start); the rest up to step 1 is rayft's


def rayft_share(t: dict[str, float]) -> float:
    """rayft's own share of start -> first step: everything but ray.init and Ray Train's worker start (and the
    first step itself, which is the model's work)."""
    return t["start_to_first_step_s"] - sum(t.get(k, 0.0) for k in RAYS_OWN) - t.get("first_step_s", 0.0)


def sizes_main(quickstart: Path, sizes: list[int], before: str, rounds: int) -> None:
    """Each span of `rayft train` at each data size, the tree at `before` against this one."""
    import yaml

    from orchestrator import tinymodels

    out = Path(tempfile.mkdtemp(prefix="rayft-overhead-sizes-"))
    old = out / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), before], check=True, capture_output=True)
    try:
        result: dict[str, Any] = {"before": before, "sizes": {}}
        for n in sizes:
            data = tinymodels.write_colour_data(out / f"data-{n}", "french", n, 128, seed=1)
            body = yaml.safe_load((quickstart / "jobs" / "qlora.yaml").read_text())
            body.update(model=str((quickstart / "base").resolve()), output=str(out / f"runs-{n}"))
            body["data"].update(train=str(data["train"]), eval=str(data["eval"]))
            job_file = out / f"job-{n}.yaml"
            job_file.write_text(yaml.safe_dump(body))
            # 1,000 rows: one epoch (the epoch's wall against its summed step time); larger: the first 32 steps
            sets = ["train.epochs=1"] if n <= 1000 else ["train.max_steps=32"]
            print(f"\n{n} rows ({' '.join(sets)}): before ({before}) and after, {rounds} round(s) ...", flush=True)
            # every run in an output directory of its own: its data cache is new, as on a first run over this data
            rows = alternate(
                {"before": lambda: rayft_train(job_file, Path(tempfile.mkdtemp(dir=out)), sets, code=old),  # noqa: B023
                 "after": lambda: rayft_train(job_file, Path(tempfile.mkdtemp(dir=out)), sets)},  # noqa: B023
                rounds=rounds,
            )
            b, a = rows["before"]["median"], rows["after"]["median"]
            result["sizes"][n] = {"sets": sets, **rows}
            print(f"{'span':<22} {'before':>9} {'after':>9}  ratio")
            for key in SIZE_SPANS:
                if key in b or key in a:
                    bv, av = b.get(key, float("nan")), a.get(key, float("nan"))
                    print(f"{key:<22} {bv:>9.2f} {av:>9.2f}  {av / bv if bv else float('nan'):.2f}")
            print(f"{'rayft share to step 1':<22} {rayft_share(b):>9.2f} {rayft_share(a):>9.2f}  (all but ray.init, worker start, the step)")
            if "steps_s" in a:
                print(f"wall / summed step time: before {b['wall_s'] / b['steps_s']:.2f}x, after {a['wall_s'] / a['steps_s']:.2f}x")
        firsts = {n: result["sizes"][n]["after"]["median"]["start_to_first_step_s"] for n in sizes}
        if len(sizes) > 1:
            print("\nstart -> first step, after: " + ", ".join(f"{n} rows {v:.1f} s" for n, v in firsts.items())
                  + f"; largest / smallest {firsts[max(sizes)] / firsts[min(sizes)]:.2f}x")
        write_result("overhead_sizes_" + "_".join(str(n) for n in sizes), result)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("quickstart", nargs="?", default=str(REPO / "quickstart"), help="a built `rayft quickstart` directory (base/, data/, jobs/)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--long", action="store_true", help=f"also one run of ~{LONG_SECONDS // 60} minutes of optimizer steps")
    ap.add_argument("--long-steps", type=int, help="steps of the --long run (default: sized from the fastest short run)")
    ap.add_argument(
        "--worker-niceness", type=int,
        help="RAY_worker_niceness for the runs. Ray starts its worker processes at nice 15: on a machine shared with "
        "other work at nice 0, Ray Train's workers then get a small share of the CPU while the plain-process floor "
        "does not; 0 compares them on equal terms. Default: Ray's own.",
    )
    ap.add_argument("--rows", type=int, nargs="+", help="data sizes to compare (with --before), e.g. 1000 50000")
    ap.add_argument("--before", help="an earlier commit to compare with, span by span (with --rows)")
    ap.add_argument("--floor", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--ray-floor", metavar="OUT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.floor:
        floor_main(*args.floor)
        return
    if args.ray_floor:
        ray_floor_main(args.ray_floor)
        return
    if args.rows:
        sizes_main(Path(args.quickstart).resolve(), args.rows, args.before or "HEAD", args.rounds)
        return
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # the rayft subprocesses inherit it
    job_file = Path(args.quickstart).resolve() / "jobs" / "qlora.yaml"
    out = Path(tempfile.mkdtemp(prefix="rayft-overhead-"))
    rows = alternate(
        {"rayft": lambda: rayft_train(job_file, out / "runs", SHORT), "floor": lambda: floor(job_file, out), "ray_floor": lambda: ray_floor(out)},
        rounds=args.rounds,
    )
    short, plain, ray_only = rows["rayft"]["median"], rows["floor"]["median"], rows["ray_floor"]["median"]
    result: dict[str, Any] = {
        "job": str(job_file),
        "worker_niceness": args.worker_niceness,
        "short": {"sets": SHORT, **rows["rayft"]},
        "floor": rows["floor"],
        "ray_floor": rows["ray_floor"],
    }

    print("\nstart -> first optimizer step and where the wall time goes (median of", args.rounds, "short runs, seconds):")
    print_breakdown(short)
    print(f"start -> first step: {short['start_to_first_step_s']:.2f} s (from outside: {short['outside_first_step_s']:.2f} s); "
          f"plain process (no Ray): {plain['outside_first_step_s']:.2f} s; "
          f"Ray Train alone (no-op train function): {ray_only['outside_first_step_s']:.2f} s "
          f"(ray.init {ray_only['ray_init_s']:.2f}, TorchTrainer {ray_only['trainer_build_s']:.2f}, fit -> function {ray_only['worker_start_s']:.2f})")
    print(f"wall {short['wall_s']:.1f} s, summed step time {short['steps_s']:.2f} s, overhead {short['overhead_pct']:.1f}%")

    def first_step_row(measure: str, baseline: dict[str, float], note: str) -> dict[str, Any]:
        first, base = short["start_to_first_step_s"], baseline["outside_first_step_s"]
        return {"benchmark": "overhead", "measure": measure, "rayft": round(first, 2), "baseline": round(base, 2), "ratio": round(first / base, 2), "note": note}

    summary = [
        first_step_row(
            "start -> first optimizer step (s), QLoRA quickstart job", plain, "goal <= 10 s; baseline: the same set-up + one step in a plain process, no Ray"
        ),
        first_step_row(
            "start -> first optimizer step (s) vs Ray Train alone",
            ray_only,
            "baseline: rayft's embedded Ray + a 1-worker TorchTrainer whose train function does nothing",
        ),
        {
            "benchmark": "overhead",
            "measure": f"(wall - summed step time) / wall, {short['wall_s']:.0f} s run",
            "rayft": f"{short['overhead_pct']:.1f}%",
            "baseline": None,
            "ratio": None,
            "note": f"{short['steps_s']:.1f} s of optimizer steps in {short['wall_s']:.1f} s",
        },
    ]
    write_result("overhead", result, summary=summary)  # kept if the long run fails or is cut short
    if args.long:
        # 32 steps took steps_s in a short run; the fastest round is the least disturbed by other load
        steps = args.long_steps or int(LONG_SECONDS * 32 / min(r["steps_s"] for r in rows["rayft"]["runs"]))
        sets = [f"train.max_steps={steps}", "train.eval_every=2000", "train.checkpoint_every=2000", "train.log_every=100"]
        print(f"\nlong run: {steps} steps (eval + checkpoint every 2000) ...", flush=True)
        long = rayft_train(job_file, out / "runs", sets)
        result["long"] = {"sets": sets, **long}
        print_breakdown(long)
        print(f"wall {long['wall_s']:.1f} s, summed step time {long['steps_s']:.1f} s, overhead {long['overhead_pct']:.2f}%")
        summary.append(
            {
                "benchmark": "overhead",
                "measure": f"(wall - summed step time) / wall, {long['wall_s'] / 60:.1f} min run",
                "rayft": f"{long['overhead_pct']:.2f}%",
                "baseline": None,
                "ratio": None,
                "note": f"goal < 3%; {steps} steps, eval + checkpoint every 2000",
            }
        )
    write_result("overhead", result, summary=summary)


if __name__ == "__main__":
    main()
