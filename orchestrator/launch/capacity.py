"""What the training workers can use, read from Ray once it is up (Capacity.from_ray): the alive nodes'
CPUs, GPUs and GPU model, never the machine this process runs on, which on a cluster is the GPU-less head
(`rayft submit`'s driver). resources_for turns it into a job's per-worker reservation; the search's trial
concurrency and the planner's GPU budget come from the same numbers.

Half of every node's CPUs stay free for Ray Data's tasks (decoding and encoding rows beside training; with
none left they wait forever): the embedded Ray adds as many logical CPUs as the machine has cores for them
(localray.data_cpus), and on a cluster the training workers reserve at most half of a node's CPUs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from orchestrator.config import JobConfig, uses_gpu

GPU_MIB = {
    "B200": 183_359, "H200": 143_771, "H100": 81_559, "A100-80G": 81_920, "A100-40G": 40_960, "A100": 40_960,
    "L40S": 46_068, "L40": 46_068, "A40": 46_068, "A10G": 23_028, "A10": 23_028, "L4": 23_034, "V100": 16_384, "T4": 15_360,
}
"""Memory (MiB, as nvidia-smi reports it) of the GPU models Ray names in its accelerator_type resources;
an ambiguous name takes its smallest variant (A100: 40 GB)."""


@dataclass(frozen=True)
class Node:
    cpus: int
    """CPUs the training workers may reserve on this node (the rest are Ray Data's)."""
    gpus: int
    gpu_type: str | None = None
    """Ray's accelerator_type of the node's GPUs (H100, A100-80G, ...), when Ray knows it."""


@dataclass(frozen=True)
class Capacity:
    nodes: tuple[Node, ...]
    where: str
    """"this machine" (the embedded Ray, or before Ray starts) or "the Ray cluster"."""

    @property
    def cpus(self) -> int:
        return sum(n.cpus for n in self.nodes)

    @property
    def gpus(self) -> int:
        return sum(n.gpus for n in self.nodes)

    @property
    def one_machine(self) -> bool:
        """Every worker runs on this machine, beside the driver's files: the embedded Ray, of one node. Never a
        cluster's, even of one node now: an autoscaler may add nodes that cannot see this machine's disk."""
        return self.where == "this machine" and len(self.nodes) == 1

    def cpus_per_gpu(self) -> int:
        """On the GPU node with the fewest: its training CPUs per GPU (0 without GPUs)."""
        return min((n.cpus // n.gpus for n in self.nodes if n.gpus), default=0)

    def gpu_memory(self) -> tuple[str, int] | None:
        """(the GPU model, its memory in bytes) of the smallest GPU model Ray names on the nodes, if known
        (a name with a suffix Ray adds, H100-SXM, falls back to its stem)."""
        known = [(GPU_MIB.get(name) or GPU_MIB.get(name.split("-")[0]), name) for name in {n.gpu_type for n in self.nodes if n.gpus and n.gpu_type}]
        mib, name = min(((m, n) for m, n in known if m), default=(0, ""))
        return (name, mib * 2**20) if mib else None

    @staticmethod
    def from_ray(embedded: bool) -> Capacity:
        """The nodes of the Ray this process is connected to. embedded: the local Ray that rayft started on
        this machine, whose extra logical CPUs (localray.data_cpus) are Ray Data's."""
        import ray

        from orchestrator.launch.localray import data_cpus

        nodes = []
        for node in ray.nodes():
            if not node.get("Alive"):
                continue
            res = node.get("Resources") or {}
            cpus = int(res.get("CPU", 0))
            types = sorted(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:"))
            nodes.append(Node(max(0, cpus - data_cpus()) if embedded else cpus // 2, int(res.get("GPU", 0)), types[0] if types else None))
        return Capacity(tuple(nodes), "this machine" if embedded else "the Ray cluster")

    @staticmethod
    def this_machine() -> Capacity:
        """This machine before any Ray starts (validate, plan, a search's fit check): its cores, and the GPUs
        nvidia-smi lists."""
        from orchestrator.planner import gpu_memory

        found = gpu_memory()
        return Capacity((Node(os.cpu_count() or 1, found[0] if found else 0),), "this machine")


def resources_for(job: JobConfig, capacity: Capacity):
    """What each training worker reserves: a GPU when used, and scaling.cpus_per_worker CPUs, or by default
    (GPU) the training CPUs per GPU of the leanest GPU node, (CPU) the training CPUs split among the workers."""
    from jobs.driver import Resources

    use_gpu = uses_gpu(job, capacity.gpus > 0)
    if job.scaling.cpus_per_worker:
        cpus = job.scaling.cpus_per_worker
    elif use_gpu and capacity.gpus:
        cpus = capacity.cpus_per_gpu()
    else:
        cpus = min(max((n.cpus for n in capacity.nodes), default=1), capacity.cpus // job.scaling.workers)
    return Resources(use_gpu=use_gpu, cpus_per_worker=max(1, cpus))


def training_cpus(job: JobConfig) -> int:
    """The logical CPUs an embedded Ray gives training workers: the machine's cores, or what the job's
    explicit scaling.cpus_per_worker asks for if that is more."""
    return max(os.cpu_count() or 1, (job.scaling.cpus_per_worker or 0) * job.scaling.workers)
