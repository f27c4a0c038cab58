"""The embedded local Ray a run starts (or the cluster it joins), and where this process's output goes while it runs (output_to: ray.log)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def ensure_local_ray(num_cpus: int, dashboard: bool = False, connect: bool = False) -> bool:
    """Start an embedded single-machine Ray unless one is already up in this process; True if started here.
    num_cpus: what the training workers reserve; Ray gets as many logical CPUs again as the machine has
    cores for the Ray Data tasks that decode and encode rows beside them (with none left, Ray Data waits
    for CPUs forever).
    connect: join the cluster this process runs on instead (a job submitted with `rayft submit`).

    dashboard: also start the dashboard (on 127.0.0.1). Ray Train's PlacementGroupCleaner asks the State API,
    which the dashboard serves, whether a controller has died; without it, the workers of a Tune trial that
    ASHA stopped are never released."""
    import ray

    from orchestrator import processes

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # never phone home
    # ray.init replaces the SIGTERM handler with sys.exit; a handler rayft installed (orchestrator/signals.py) comes back after it
    sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # workers inherit this: no bars in ray.log
    if connect:
        ray.init(address="auto", log_to_driver=True, logging_level="WARNING")
        _restore_sigterm(sigterm)
        return True
    processes.sweep()  # the Ray processes of an earlier rayft command that was killed
    # Ray Train's controller polls its workers every 2 s by default: fit() returns only after the poll that
    # sees the workers done (4-5 s after the last step here), and a report waits while the previous one is
    # still queued. On one machine a poll is cheap; 0.5 s cut that tail to ~1.6 s (bench/overhead.py).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Ray starts one idle Python worker per logical CPU (here: the training CPUs and as many again for Ray Data)
    # when the driver connects. Nothing here uses them: Ray Train's controller and workers are actors, small data
    # needs no Ray Data task, and a larger file's pass starts its own. On 2 cores they took the CPU from Ray
    # Train's start: rayft train of the quickstart job, 2 rounds alternated, wall 31.5/32.1 -> 29.1/29.2 s, start
    # -> first step 20.0/20.6 -> 18.4/17.6 s (bench/overhead.py's spans). On a 96-core node it is ~190 processes.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    # Ray processes that look the cluster up by themselves (Ray Train's PlacementGroupCleaner asks the State
    # API) fail with "Found multiple active Ray instances" when another Ray runs on the machine, and then
    # never release a stopped trial's placement group. So the GCS port is chosen here and every worker of
    # this job is told it (RAY_ADDRESS in the job's runtime_env).
    port = processes.free_port()
    previous = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus + data_cpus(),
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=True,
            logging_level="WARNING",
            runtime_env={"env_vars": {"RAY_ADDRESS": f"127.0.0.1:{port}"}},
        )
    finally:
        if previous is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = previous
    processes.record_local_ray()
    _restore_sigterm(sigterm)
    return True


def _restore_sigterm(handler: Any) -> None:
    if callable(handler):
        signal.signal(signal.SIGTERM, handler)


def shutdown_ray() -> None:
    """Stop the embedded Ray, and then whatever of its processes is still running (its agents can linger)."""
    import ray

    from orchestrator import processes

    processes.record_local_ray(update_only=True)  # the workers started since Ray came up
    ray.shutdown()
    processes.release_local_ray()


def data_cpus() -> int:
    """Logical CPUs an embedded Ray adds for Ray Data beside the training reservation: the machine's cores."""
    return os.cpu_count() or 1


@contextlib.contextmanager
def output_to(log_path: Path, user_stream: IO[str] | None = None) -> Iterator[IO[str]]:
    """Send this process's stdout/stderr (Ray's own output, worker logs) to log_path; yield a stream that
    still reaches where user_stream (default stdout; stderr under --json) went, for rayft's own progress."""
    user_stream = user_stream or sys.stdout
    try:
        fd_out, fd_err = sys.stdout.fileno(), sys.stderr.fileno()
        user_fd = user_stream.fileno()
    except (AttributeError, OSError, ValueError):  # already captured (CliRunner, notebooks): nothing to move
        with log_path.open("a"):
            yield user_stream
        return
    sys.stdout.flush()
    sys.stderr.flush()
    user_stream.flush()
    saved_out, saved_err = os.dup(fd_out), os.dup(fd_err)
    user = os.fdopen(os.dup({fd_out: saved_out, fd_err: saved_err}.get(user_fd, user_fd)), "w", buffering=1)
    with log_path.open("a") as log:
        os.dup2(log.fileno(), fd_out)
        os.dup2(log.fileno(), fd_err)
        try:
            yield user
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved_out, fd_out)
            os.dup2(saved_err, fd_err)
            os.close(saved_out)
            os.close(saved_err)
            user.close()
