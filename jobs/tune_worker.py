"""A search trial of one worker on one machine, run by Ray Tune's trial actor itself (orchestrator/trial.py says
which trials: in_trial_actor). A TorchTrainer per trial starts a Ray Train controller and a worker process beside
the trial's actor (7-9 s a trial on a 2-core machine, before its first step) for one worker that the trial's
actor can be: the actor reserves the worker's CPUs (and its GPU) and runs jobs/train_loop.py's loop in-process.

What Ray Train gives its worker comes from here instead:
- the device: the trial's GPU (Ray sets CUDA_VISIBLE_DEVICES to the one GPU the trial reserved: cuda:0), else
  the CPU; and a torch.distributed process group of one rank (jobs/local_worker.process_group), as Ray
  Train's TorchConfig sets up (DeepSpeed needs one);
- the data: the rows encoded once, read from this machine's disk (stream.direct_shards), or, for data too large
  to read in-process, the same Ray Data streams a TorchTrainer would be given, iterated by this actor;
- checkpoints: stored in TRIAL_DIR/checkpoints (jobs/checkpoint.store) and pruned as Ray Train's CheckpointConfig
  does (train.keep_checkpoints, the best by the search's metric, the newest always); a retried or resumed
  trial continues from its newest;
- reports: ray.tune.report (ASHA, the budget's stopper and the search's results read them);
- restarts: Tune's (FailureConfig(max_failures=tune.max_failures) on the Tuner: orchestrator/search.py); the
  trial's failures are recorded by jobs.failure_recorder.TrialFailures on the driver.
The fault drill RAYFT_KILL_IN_CHECKPOINT is Ray Train's storage's (a kill during its upload): not run here.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jobs import checkpoint, stream
from jobs.driver import Resources, worker_config
from orchestrator.config import JobConfig


def device_for(use_gpu: bool) -> Any:
    """The trial's device: Ray makes the one GPU the trial reserved the only visible one (cuda:0)."""
    import torch

    if use_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("the trial reserved a GPU but CUDA sees none (CUDA_VISIBLE_DEVICES is empty): check the node's NVIDIA driver")
        return torch.device("cuda", 0)
    return torch.device("cpu")


def run(job: JobConfig, trial_dir: Path, resources: Resources, indexes: dict[str, Any], keep_best: str) -> None:
    """Train the trial's job in this process (Tune's trial actor) into trial_dir, from its newest checkpoint if
    it has one (Tune's retry of a failed trial, or a resumed search)."""
    import ray
    import ray.tune

    from jobs.local_worker import checkpoint_step, one_rank, process_group
    from jobs.train_loop import recording_fatal, reset_peaks, run_worker

    clock = {"worker_started": time.time()}
    device = device_for(resources.use_gpu)
    reset_peaks(device)  # the actor may have trained a trial before this one (reuse_actors): this trial's peaks are its own
    process_group(device)
    resume = checkpoint.newest(trial_dir)
    plan = stream.plan(job, indexes, 1, checkpoint_step(resume) if resume else 0, local=True)
    node = ray.get_runtime_context().get_node_id()
    if plan.direct:
        train, evals = stream.direct_shards(plan.direct, 0, node)
    else:  # Ray Data's tasks encode the micro batches; their order is the schedule's, as DataConfig keeps it for Ray Train
        from ray.data import DataContext

        DataContext.get_current().execution_options.preserve_order = True
        train, evals = plan.datasets["train_0"], plan.datasets.get("eval_0")

    def report(metrics: dict[str, Any], ckpt_dir: str | None, upload: Any) -> None:
        if ckpt_dir is not None:
            checkpoint.store(trial_dir, ckpt_dir, int(metrics["step"]))
            checkpoint.prune(trial_dir, job.train.keep_checkpoints, keep_best)
        ray.tune.report(metrics)

    worker = one_rank(device, train, evals, resume, report, node, runner="tune_trial")
    with recording_fatal(trial_dir):
        run_worker(worker_config(job, trial_dir, resources, indexes, plan), worker, clock)
