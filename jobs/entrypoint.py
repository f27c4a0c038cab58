"""What a Ray cluster runs for `rayft submit` (and for cluster/rayjob.yaml):

    python -m jobs.entrypoint job.yaml --run-dir PATH_OR_URI

1. load and check the job on the cluster: the model and data must be readable here (shipped inputs are in
   the working directory); otherwise exit 2 naming the file, within seconds of submission;
2. print `rayft: inputs ok` (what `rayft submit` waits for), then train exactly as `rayft train` does,
   on the cluster this process runs on;
3. the run directory is PATH (local or NFS) or, for a URI (s3://, gs://, file://...), a local scratch
   directory uploaded to the URI at the end with pyarrow: everything else first, model/ next, manifest.json
   last, so a manifest at the URI means a complete model.

A stopped job (SIGTERM) checkpoints its current step and leaves, at most, model.partial: never a
half-written model/. A driver started again with the same run directory resumes from it.
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
    then manifest.json (last: its presence means the model above it is complete). Never an unfinished or
    unverified export: model.partial (being written) and model.failed (failed its parity check) stay local."""
    from pyarrow import fs

    target, root = fs.FileSystem.from_uri(uri)
    unexported = ("model", "manifest.json", "model.partial", "model.failed")
    first = [p for p in local.iterdir() if p.name not in unexported and not p.name.endswith((".partial", ".failed"))]
    for top in [*first, local / "model", local / "manifest.json"]:
        if not top.exists():
            continue
        for source in [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()):
            dest = f"{root}/{source.relative_to(local).as_posix()}"
            target.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            with source.open("rb") as src, target.open_output_stream(dest) as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)


def download(uri: str, local: Path) -> bool:
    """Copy a run directory an earlier attempt of this job uploaded to the URI (everything but model/ and
    the job package) into local; False if the URI holds no run (no job.yaml)."""
    from pyarrow import fs

    source, root = fs.FileSystem.from_uri(uri)
    if source.get_file_info(f"{root}/job.yaml").type != fs.FileType.File:
        return False
    for info in source.get_file_info(fs.FileSelector(root, recursive=True)):
        rel = info.path[len(root) :].lstrip("/")
        if info.type != fs.FileType.File or rel.split("/")[0] in ("model", "model.partial", "package", "manifest.json"):
            continue
        dest = local / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with source.open_input_stream(info.path) as src, dest.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=8 << 20)
    return True


RELOCATED = "RAYFT_RELOCATED"
DRIVER = "RAYFT_DRIVER_ATTEMPT"  # set in the driver processes `supervise` starts
SCRATCH = "RAYFT_SCRATCH"  # a URI run's local scratch directory, shared by the drivers of one job
ENDED = (0, 1, 2, 130, 143)  # done, failed, bad input, stopped: a new driver would not change these


def supervise(argv: list[str], job_file: str, run_dir: str) -> int:
    """Run the driver as a child process, and start it again (submit.driver_retries times) when it dies
    of anything but an ending exit code: a SIGKILL, the OOM killer, a crash. The new driver finds the run
    directory holding the run and resumes it. SIGTERM/SIGINT (`rayft stop`) go to the driver, which
    checkpoints and stops; that ends the job."""
    import signal
    import subprocess

    from orchestrator.config import JobConfig, load_raw

    try:
        retries = JobConfig.model_validate(load_raw(job_file)).submit.driver_retries
    except Exception:  # the driver reports the job's problems itself
        retries = 0
    scratch = tempfile.mkdtemp(prefix="rayft-run-") if "://" in run_dir else ""
    child: subprocess.Popen | None = None
    stopping = False

    def forward(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for attempt in range(1, retries + 2):
        child = subprocess.Popen([sys.executable, "-m", "jobs.entrypoint", *argv], env={**os.environ, DRIVER: str(attempt), SCRATCH: scratch})
        rc = child.wait()
        if rc in ENDED or stopping or attempt > retries:
            return rc if rc >= 0 else 128 - rc
        print(f"rayft: the driver died (exit {rc}); starting it again ({attempt} of submit.driver_retries: {retries}), resuming from {run_dir}", flush=True)
    return 1


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
    if not os.environ.get(DRIVER):
        return supervise(sys.argv[1:] if argv is None else argv, args.job_file, args.run_dir)

    # torch (and its oneMKL) must load before this process connects to the cluster: measured here, after
    # ray.init on a two-node cluster, `import torch` dies with "Intel oneMKL FATAL ERROR: Cannot load
    # libtorch_cpu.so" (one node is fine). One small matmul makes MKL load its kernels now.
    import torch

    torch.ones(256, 256) @ torch.ones(256, 256)

    from jobs.data import DataError
    from orchestrator import launch
    from orchestrator.config import ConfigError, load_job

    is_uri = "://" in args.run_dir
    run_dir = Path(os.environ.get(SCRATCH) or tempfile.mkdtemp(prefix="rayft-run-")) / Path(args.run_dir).name if is_uri else Path(args.run_dir)
    try:
        job, warnings = load_job(args.job_file, cluster=True)  # on the head: the GPUs are the workers' nodes
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

    # A driver started again for the same run directory (by `supervise`, KubeRay's RayJob backoffLimit, a job
    # re-submitted with the same --run-dir) resumes from its checkpoints instead of starting over. For a URI:
    # from the scratch copy on this node if `supervise` restarted it, else from what an earlier driver
    # uploaded (it uploads on every exit it lives through: done, failed, SIGTERM).
    resume = run_dir if (run_dir / "job.yaml").is_file() else None
    if resume is None and is_uri and download(args.run_dir, run_dir):  # an earlier driver on another node, or job
        resume = run_dir
    if resume is not None:
        from jobs.checkpoint import resume_step

        print(f"rayft: {args.run_dir} already holds this run: resuming from the checkpoint of step {resume_step(run_dir)}", flush=True)
    print(f"rayft: run directory {args.run_dir}", flush=True)
    try:
        outcome = launch.train(job, run_dir=None if resume else run_dir, resume=resume, connect=True, progress=True, job_file=args.job_file)
    except launch.RunFailed as e:
        print(f"rayft: {e}", flush=True)
        return 1
    except launch.Interrupted as e:  # SIGTERM (a node drained, the job stopped): checkpointed; a new driver resumes
        print(f"rayft: {e}", flush=True)
        return e.exit_code
    finally:
        if is_uri and run_dir.exists():
            upload(run_dir, args.run_dir)
    m = outcome.manifest["metrics"]
    if m.get("eval_accuracy") is not None:
        print(f"rayft: {launch.accuracy_line(m)}", flush=True)
    print(f"rayft: merged model {args.run_dir.rstrip('/')}/model", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
