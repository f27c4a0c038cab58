"""The data path at scale: `rayft train` on 1k, 10k and 50k rows of 384x384 images through Ray Data, against
the old in-memory path (every row encoded in the worker before step 1), where that fits.

    scripts/netns.sh .venv/bin/python bench/data_scale.py [--auto 1000 10000] [--off 1000 50000] [--old 1000 10000]
        [--max-steps-50k 300] [--old-rev b87f88f] [--work /tmp/rayft-data-scale]

Contenders (sizes per contender):
- auto: rayft's default, data.encode_once: auto (rows encoded once by a Ray Data pass and kept on disk
  when they fit half the free disk, then streamed);
- off: data.encode_once: off (Ray Data encodes rows as they stream to the worker: the path for data too
  large to encode once; 50k rows here would be 85 GB encoded);
- in_memory: the code of --old-rev.

A tiny LLaVA at SigLIP-384 geometry (384 px, patch 14: 729 image tokens, 742 tokens a row; text hidden 64 x 2
layers) is built from config; rows are JPEG images (a coloured shape on a noisy grey background, ~25 KB
each, so decoding costs what a photo's does) with the colour question. The job: LoRA, bf16, 1 worker, micro
batch 8, one epoch (the largest size stops after --max-steps-50k steps: its epoch is projected from the
steady rate), one eval of 256 rows at the end. The old path is the code of --old-rev, unpacked with
`git archive` and run by the same interpreter.

For each run: peak memory of all the run's processes (the sum of PSS over every process in the namespace:
Ray's object store in /dev/shm is counted once, shared among the processes that map it), the controller's
peak RSS (the `rayft train` process), start -> first optimizer step, the validation pass, steady samples/s
(median of the train-loss windows after the first) and the wall time of the epoch (command start -> last
step). A run whose processes pass --memory-limit-gib (default 20) is stopped and reported as not fitting.
Results: bench/results/data_scale.json and the README table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

from common import REPO, ratio, write_result

IMAGE, PATCH = 384, 14
MICRO = 8
EVAL_ROWS = 256


def write_rows(path: Path, n: int, seed: int) -> Path:
    """n colour rows with 384x384 JPEG images, written 1000 rows at a time (memory stays small)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageDraw

    from orchestrator import tinymodels

    if path.is_file():
        return path
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    names = list(tinymodels.COLOURS)
    tmp = path.with_suffix(".tmp")
    writer = None
    for start in range(0, n, 1000):
        rows = []
        for i in range(start, min(n, start + 1000)):
            colour = names[i % len(names)]
            noise = nprng.normal(128, 12, (IMAGE // 4, IMAGE // 4, 3)).clip(0, 255).astype("uint8")
            img = Image.fromarray(noise).resize((IMAGE, IMAGE))
            draw = ImageDraw.Draw(img)
            size = rng.randint(80, 160)
            x, y = rng.randint(2, IMAGE - size - 2), rng.randint(2, IMAGE - size - 2)
            draw.ellipse((x, y, x + size, y + size), fill=tinymodels.COLOURS[colour][0])
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            rows.append({"image": buf.getvalue(), "question": tinymodels.QUESTIONS["english"], "answer": colour})
        table = pa.Table.from_pylist(rows)
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    tmp.rename(path)
    return path


def material(work: Path, sizes: list[int]) -> tuple[Path, dict[int, Path], Path]:
    from orchestrator import tinymodels

    model = work / "model"
    if not (model / "config.json").is_file():
        tinymodels.build_tiny_llava(model, image_size=IMAGE, patch_size=PATCH)
    data = {n: write_rows(work / f"train-{n}.parquet", n, seed=n) for n in sizes}
    return model, data, write_rows(work / "eval.parquet", EVAL_ROWS, seed=1)


def old_tree(work: Path, rev: str) -> Path:
    out = work / f"old-{rev}"
    if not (out / "jobs").is_dir():
        out.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True, check=True).stdout
        tarfile.open(fileobj=io.BytesIO(archive)).extractall(out)
    return out


class Sampler:
    """Every 0.5 s: the sum of PSS over every process but this one (inside the bench's pid namespace: the
    run's processes), /dev/shm in use, and the controller's peak RSS (VmHWM)."""

    def __init__(self, controller: int, limit_bytes: int):
        self.controller, self.limit = controller, limit_bytes
        self.peak_total = self.peak_shm = self.controller_hwm = 0
        self.over = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            total = 0
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == me:
                    continue
                try:
                    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                        if line.startswith("Pss:"):
                            total += int(line.split()[1]) * 1024
                            break
                    if int(pid) == self.controller:
                        hwm = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM"))
                        self.controller_hwm = max(self.controller_hwm, int(hwm.split()[1]) * 1024)
                except (OSError, StopIteration, ValueError):
                    continue
            st = os.statvfs("/dev/shm")
            self.peak_shm = max(self.peak_shm, (st.f_blocks - st.f_bfree) * st.f_frsize)
            self.peak_total = max(self.peak_total, total)
            if total > self.limit and not self.over:
                self.over = True
                for pid in os.listdir("/proc"):  # everything but this process: the run and its Ray
                    if pid.isdigit() and int(pid) not in (me, 1):
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except OSError:
                            pass
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(name: str, code: Path, model: Path, data: Path, eval_file: Path, work: Path, max_steps: int | None, limit_gib: float, encode_once: str | None) -> dict[str, Any]:
    import yaml

    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)  # cold: no row store, validation index or encoded rows from before
    job = {
        "name": name, "model": str(model), "output": str(out),
        "data": {"train": str(data), "eval": str(eval_file), "max_length": 800, **({"encode_once": encode_once} if encode_once else {})},
        "method": "lora", "precision": "bf16", "quantization": {"type": "none"},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
        "train": {"epochs": 1, "micro_batch_size": MICRO, "lr": 2e-4, "eval_every": 10**6, "checkpoint_every": 10**6, "log_every": 10,
                  **({"max_steps": max_steps} if max_steps else {})},
    }
    job_file = work / f"{name}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    env = {**os.environ, "PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "from orchestrator.cli import main; main()", "train", str(job_file), "--no-progress", "--no-fit-check", "--json"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(code))
    sampler = Sampler(proc.pid, int(limit_gib * 2**30))
    stdout, stderr = proc.communicate()
    sampler.stop()
    wall = time.time() - t0
    result: dict[str, Any] = {"peak_total_mib": sampler.peak_total / 2**20, "peak_shm_mib": sampler.peak_shm / 2**20,
                              "controller_peak_mib": sampler.controller_hwm / 2**20, "wall_s": wall, "exit": proc.returncode}
    if sampler.over:
        result["did_not_fit"] = f"stopped above {limit_gib} GiB"
        return result
    if proc.returncode != 0:
        result["error"] = (stderr or stdout)[-1500:]
        return result
    manifest = json.loads(stdout[stdout.index("{\n") :])
    run_dir = Path(manifest["run_dir"])
    from jobs.metrics_log import read_metrics

    records = read_metrics(run_dir)
    t = manifest["timings"]
    rates = [r["samples_per_s"] for r in records if r.get("event") == "train"][1:]
    end = next(r for r in records if r.get("event") == "end")
    steps = end["step"]
    result.update(
        rows=next(r for r in records if r.get("event") == "start")["rows"],
        steps=steps,
        start_to_first_step_s=t.get("start_to_first_step_s"),
        validation_s=t.get("validation_s"),
        encode_once_s=t.get("encode_once_s"),
        steady_samples_per_s=statistics.median(rates) if rates else None,
        epoch_wall_s=end["time"] - (t0 + 0.0) if not max_steps else None,
        data_wait_s=end.get("data_wait_s"),
        eval_accuracy=manifest["metrics"].get("eval_accuracy"),
        timings=t,
    )
    print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items() if k != "timings"), flush=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--auto", type=int, nargs="*", default=[1000, 10000], help="sizes for data.encode_once: auto (the default)")
    ap.add_argument("--off", type=int, nargs="*", default=[1000, 50000], help="sizes for data.encode_once: off")
    ap.add_argument("--old", type=int, nargs="*", default=[1000, 10000], help="sizes for the in-memory path")
    ap.add_argument("--max-steps-50k", type=int, default=300, help="steps of runs of 50k rows or more (their epoch is projected)")
    ap.add_argument("--old-rev", default="b87f88f", help="the commit of the in-memory data path")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rayft-data-scale"))
    ap.add_argument("--memory-limit-gib", type=float, default=20.0)
    ap.add_argument("--merge", action="store_true", help="keep the runs already in bench/results/data_scale.json (add or replace these)")
    args = ap.parse_args()
    if os.environ.get("RAYFT_IN_NETNS") != "1":
        sys.exit("run it inside scripts/netns.sh: it sums the memory of every process it can see, and stops them all past the limit")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    sizes = sorted(set(args.auto) | set(args.off) | set(args.old))
    model, data, eval_file = material(args.work, sizes)
    print(f"material ready in {time.time() - t0:.0f}s", flush=True)
    old = old_tree(args.work, args.old_rev) if args.old else None
    results: dict[str, dict[str, Any]] = {}
    saved = REPO / "bench" / "results" / "data_scale.json"
    if args.merge and saved.is_file():
        results.update(json.loads(saved.read_text()).get("runs", {}))
    for n in sizes:
        steps = args.max_steps_50k if n >= 50000 else None
        for contender, chosen, code, encode in (("auto", args.auto, REPO, None), ("off", args.off, REPO, "off"), ("in_memory", args.old, old, None)):
            if n not in chosen:
                continue
            assert code is not None
            name = f"{contender}-{n}"
            results[name] = r = run(name, code, model, data[n], eval_file, args.work, steps, args.memory_limit_gib, encode)
            if steps and r.get("steady_samples_per_s"):
                r["projected_epoch_s"] = r["start_to_first_step_s"] + n / r["steady_samples_per_s"]
            write_result("data_scale", {"setup": "partial: the run is still going", "runs": results})  # nothing lost if stopped
    bench = "data scale (SigLIP-384 rows, LoRA, 1 worker)"
    summary = []
    offs = sorted(int(k.split("-")[1]) for k in results if k.startswith("off-") and "peak_total_mib" in results[k])
    if len(offs) > 1:
        lo, hi = results[f"off-{offs[0]}"], results[f"off-{offs[-1]}"]
        summary.append({"benchmark": bench, "measure": f"peak MiB, all processes: {offs[-1]:,} vs {offs[0]:,} rows", "rayft": round(hi["peak_total_mib"]),
                        "baseline": round(lo["peak_total_mib"]), "ratio": ratio(hi["peak_total_mib"], lo["peak_total_mib"]), "note": "encoded as they stream; target <= 1.25x"})
    for n in sorted({int(k.split("-")[1]) for k in results if k.startswith("auto-")} & {int(k.split("-")[1]) for k in results if k.startswith("in_memory-")}):
        s, m = results[f"auto-{n}"], results[f"in_memory-{n}"]
        for key, label in (("epoch_wall_s", "epoch wall s"), ("steady_samples_per_s", "steady samples/s"), ("peak_total_mib", "peak MiB"), ("start_to_first_step_s", "start -> first step s")):
            if s.get(key) is not None and m.get(key) is not None:
                summary.append({"benchmark": bench, "measure": f"{label}, {n:,} rows", "rayft": round(s[key], 1), "baseline": round(m[key], 1),
                                "ratio": ratio(s[key], m[key]), "note": f"baseline: the in-memory path ({args.old_rev})"})
    for name in sorted(results):
        r = results[name]
        if name.startswith("off-") and r.get("validation_s") is not None:
            summary.append({"benchmark": bench, "measure": f"validation pass, {r['rows']:,} rows (s)", "rayft": round(r["validation_s"], 1), "baseline": None,
                            "ratio": None, "note": f"{1000 * r['validation_s'] / r['rows']:.2f} ms a row on 2 cores"})
    write_result("data_scale", {"setup": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"image": IMAGE, "patch": PATCH, "micro_batch": MICRO},
                                "runs": results, "wall_s": time.time() - t0}, summary=summary)
    for r in summary:
        print(r)


if __name__ == "__main__":
    main()
