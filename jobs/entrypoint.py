"""What a Ray cluster runs for `rayft submit` (and for cluster/rayjob.yaml):

    python -m jobs.entrypoint job.yaml --run-dir PATH_OR_URI

1. load and check the job on the cluster: the model and data must be readable here (shipped inputs are in
   the working directory); otherwise exit 2 naming the file, within seconds of submission;
2. print `rayft: inputs ok` (what `rayft submit` waits for), then train exactly as `rayft train` does,
   on the cluster this process runs on;
3. the run directory is PATH (local or NFS) or, for a URI (s3://, gs://, file://...), a local scratch
   directory uploaded to the URI at the end with pyarrow: everything else first, model/ next, manifest.json
   last, so a manifest at the URI means a complete model.

A stopped job (SIGTERM) leaves checkpoints and, at most, model.partial: never a half-written model/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from orchestrator.remote import INPUTS_OK


def upload(local: Path, uri: str) -> None:
    """Copy the run directory to a pyarrow filesystem URI: everything but the model first, then model/,
    then manifest.json (last: its presence means the model above it is complete). model.partial stays."""
    from pyarrow import fs

    target, root = fs.FileSystem.from_uri(uri)
    first = [p for p in local.iterdir() if p.name not in ("model", "manifest.json", "model.partial")]
    for top in [*first, local / "model", local / "manifest.json"]:
        if not top.exists():
            continue
        for source in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            dest = f"{root}/{source.relative_to(local).as_posix()}"
            target.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            with source.open("rb") as src, target.open_output_stream(dest) as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)


RELOCATED = "RAYFT_RELOCATED"


def relocate(run_dir: str) -> None:
    """Re-run this entrypoint from a copy of the job package: <run dir>/package (on the storage every node
    reads, so the workers find the shipped inputs there too) or, for a URI run dir, a local scratch copy.
    Measured on a two-node cluster: Ray deleted the job's working_dir once the training workers exited,
    while this driver still had the export to do."""
    here = Path.cwd()
    if os.environ.get(RELOCATED) or Path(__file__).resolve().parent.parent != here.resolve():
        return  # already relocated, or not run from a submitted package (e.g. a RayJob with rayft installed)
    target = Path(tempfile.mkdtemp(prefix="rayft-job-")) if "://" in run_dir else Path(run_dir) / "package"
    shutil.copytree(here, target, dirs_exist_ok=True)
    os.chdir(target)
    path = [str(target), *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != here.resolve())]
    env = {**os.environ, RELOCATED: "1", "PYTHONPATH": os.pathsep.join(path)}
    os.execve(sys.executable, [sys.executable, "-m", "jobs.entrypoint", *sys.argv[1:]], env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.entrypoint")
    parser.add_argument("job_file")
    parser.add_argument("--run-dir", required=True, help="run directory: a path every node can write, or a pyarrow URI")
    args = parser.parse_args(argv)
    relocate(args.run_dir)

    # torch (and its oneMKL) must load before this process connects to the cluster: measured here, after
    # ray.init on a two-node cluster, `import torch` dies with "Intel oneMKL FATAL ERROR: Cannot load
    # libtorch_cpu.so" (one node is fine). One small matmul makes MKL load its kernels now.
    import torch

    torch.ones(256, 256) @ torch.ones(256, 256)

    from jobs.data import DataError
    from orchestrator import launch
    from orchestrator.config import ConfigError, load_job

    is_uri = "://" in args.run_dir
    run_dir = Path(tempfile.mkdtemp(prefix="rayft-run-")) / Path(args.run_dir).name if is_uri else Path(args.run_dir)
    try:
        job, warnings = load_job(args.job_file)
        launch.preflight(job, launch.data_cache(job, run_dir), strict=True)
    except ConfigError as e:
        print("rayft: the job's inputs are not usable on the cluster:", *(f"  {p}" for p in e.problems), sep="\n", flush=True)
        return 2
    except DataError as e:
        print(f"rayft: {len(e.problems)} problem(s) in the job's inputs:\n{e}", flush=True)
        return 2
    for w in warnings:
        print(f"warning: {w}", flush=True)
    print(INPUTS_OK, flush=True)

    print(f"rayft: run directory {args.run_dir}", flush=True)
    try:
        outcome = launch.train(job, run_dir=run_dir, connect=True, progress=True)
    except launch.RunFailed as e:
        print(f"rayft: {e}", flush=True)
        return 1
    finally:
        if is_uri and run_dir.exists():
            upload(run_dir, args.run_dir)
    m = outcome.manifest["metrics"]
    if m.get("eval_accuracy") is not None:
        print(f"rayft: eval accuracy {m['initial_eval_accuracy']:.1%} -> {m['eval_accuracy']:.1%}", flush=True)
    print(f"rayft: merged model {args.run_dir.rstrip('/')}/model", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
