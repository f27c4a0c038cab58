"""`export.on: worker`: the export (jobs/merge.py: export) as a Ray task on a node of the cluster with the host
memory it needs, so a job whose driver runs on a small head node can still export a large model.

Placement is Ray's own: the task asks for `memory=` what the export needs (Ray's logical `memory` resource,
which each node advertises from its RAM, or `ray start --memory`), one CPU and no GPU, and Ray runs it on a
node that has that much unreserved; a GPU node's host RAM is usually the largest. A request larger than every
node's `memory` would wait forever as infeasible, so it is refused here first, naming the sizes.

Where it writes: checkpoint_dir and model_dir are paths of the driver's machine, and the task reads and writes
them as they are, so the node it lands on must see the same files:
- a run directory on a filesystem every node mounts (a local path on a one-machine cluster, NFS): the export
  lands in the run's storage directly;
- a URI storage_path (s3://, gs://): the driver trains into a local scratch directory and uploads it at the end
  (jobs/entrypoint.py). That scratch directory is on the driver's node only: the export works on a worker only
  when that node shares the driver's filesystem (e.g. one machine); a node on another machine cannot read the
  checkpoint there, and the task says so (naming the node and the path) instead of exporting elsewhere. What
  it writes into model_dir is what the upload then reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.config import JobConfig


class ExportPlacementError(RuntimeError):
    """No node can run the export (too little memory anywhere), or the node it ran on cannot see the run's files."""


def memory_request(job: JobConfig, checkpoint_dir: Path) -> int:
    """Bytes of host memory the export asks Ray for: the streamed export's working set from the shards' headers
    (jobs/export_stream.py: memory_needed), plus the end-to-end check's (jobs/merge.py: end_to_end_bytes, its logits at their bound) where
    it will run for sure: export.merge: in_memory (that merge is the check's models), or export.parity_memory
    an explicit size that admits it. With parity_memory auto the check runs only if the node happens to have
    that much free when it starts; nothing is reserved for it."""
    from jobs.export_stream import ExportError, memory_needed, read_layout
    from jobs.merge import end_to_end_bytes, logits_bound
    from orchestrator import architectures
    from orchestrator.planner import load_shape

    try:
        need = memory_needed(job, checkpoint_dir)
        limit = job.export.parity_bytes()
        if job.export.merge == "in_memory" or limit:
            logits = logits_bound(job, load_shape(job.model_dir).vocab)  # the check's fp32 logits: the largest term at a 152k vocabulary
            check = end_to_end_bytes(read_layout(job, architectures.for_model_dir(job.model_dir)).fp32_bytes, logits)
            if job.export.merge == "in_memory" or check <= (limit or 0):
                need += check
    except (ExportError, OSError) as e:  # no safetensors base, no adapter file: nothing to size the request by
        raise ExportPlacementError(f"export.on: worker: cannot tell how much memory the export needs: {e}; "
                                   "set export.on: driver") from e
    return need


def _largest_node() -> tuple[float, str]:
    """(memory resource, address) of the alive node with a CPU (the task takes one) that advertises the most `memory`."""
    import ray

    usable = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1]
    if not usable:
        return 0.0, "no alive node with a CPU"
    node = max(usable, key=lambda n: n["Resources"].get("memory", 0.0))
    return node["Resources"].get("memory", 0.0), node.get("NodeManagerAddress", "?")


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _run_export(job_dict: dict[str, Any], checkpoint_dir: str, model_dir: str) -> dict[str, Any]:
    """The task body, on the chosen node: export, or say why not (a ParityError's message, a path not seen here)."""
    import ray

    from jobs.merge import ParityError, export

    where = {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}
    job = JobConfig.model_validate(job_dict)
    checkpoint, out = Path(checkpoint_dir), Path(model_dir)
    for what, path in (("checkpoint", checkpoint), ("base model", Path(job.model_dir)), ("output directory's parent", out.parent)):
        if not path.exists():
            return {**where, "error": "unseen", "message": f"the {what} {path} is not visible on node {where['node_ip']} "
                    f"({where['node_id'][:12]}): export.on: worker needs the run directory on storage every node shares"}
    try:
        return {**where, "record": export(job, checkpoint, out)}
    except ParityError as e:
        return {**where, "error": "parity", "message": str(e)}


def export_on_worker(job: JobConfig, checkpoint_dir: str | Path, model_dir: str | Path) -> dict[str, Any]:
    """jobs.merge.export(job, checkpoint_dir, model_dir) as a Ray task on a node with the memory it needs; Ray
    must already be initialized (embedded or connected). Returns export's parity record with
    record["ran_on"] = {node_id, node_ip, node_name, memory_requested_bytes}. Raises ParityError (with the
    task's own message) on a failed check, ExportPlacementError when no node can take it or the node cannot
    see the run's files."""
    import ray

    from jobs.merge import ParityError

    checkpoint_dir, model_dir = Path(checkpoint_dir), Path(model_dir)
    need = memory_request(job, checkpoint_dir)
    largest, address = _largest_node()
    if need > largest:
        raise ExportPlacementError(
            f"export.on: worker: the export needs {_gib(need)} of host memory (export.merge: {job.export.merge}, "
            f"export.parity_memory: {job.export.parity_memory}) and the largest node of the cluster ({address}) offers "
            f"{_gib(largest)} of Ray's `memory` resource; add a node with more memory, lower export.parity_memory "
            "(0 skips the end-to-end check), or set export.on: driver")
    task = ray.remote(_run_export).options(num_cpus=1, num_gpus=0, memory=need, max_retries=0, name="rayft-export")
    try:
        result = ray.get(task.remote(job.model_dump(mode="json"), str(checkpoint_dir), str(model_dir)))
    except ray.exceptions.RayTaskError as e:  # anything but a failed check: the cause, not Ray's wall of text
        cause = getattr(e, "cause", None) or e
        raise RuntimeError(f"export.on: worker: the export task failed: {type(cause).__name__}: {cause}") from e
    if result.get("error") == "parity":
        raise ParityError(result["message"])
    if result.get("error"):
        raise ExportPlacementError(result["message"])
    names = {n["NodeID"]: n.get("NodeName") for n in ray.nodes()}
    record = result["record"]
    record["ran_on"] = {"node_id": result["node_id"], "node_ip": result["node_ip"], "node_name": names.get(result["node_id"]),
                        "memory_requested_bytes": need}
    return record
