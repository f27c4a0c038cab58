"""The GPU rules of DESIGN.md that a CPU can check: collectives on the training device, restored state on
the worker's own device, a 4-bit model placed where its batches are. Each test fails without its rule."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO

from orchestrator import architectures
from orchestrator.config import build_job, load_raw

COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "reduce", "gather", "scatter", "barrier", "reduce_scatter"}


def test_every_collective_of_rayft_goes_through_jobs_collective():
    """NCCL reduces CUDA tensors only and gloo takes CPU ones too, so a CPU run cannot show a CPU tensor
    handed to a collective; one helper makes the tensor on the training device, and only it calls torch."""
    found = []
    for path in sorted((REPO / "jobs").glob("*.py")) + sorted((REPO / "orchestrator").rglob("*.py")):
        if path.name == "collective.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
                if isinstance(node.func.value, ast.Name) and node.func.value.id in ("dist", "distributed"):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} dist.{node.func.attr}")
    assert not found, found


def test_a_collective_refuses_a_tensor_its_backend_cannot_reduce():
    from jobs.collective import check_device

    with pytest.raises(RuntimeError, match="nccl collective was handed a cpu tensor"):
        check_device("nccl", torch.zeros(1))
    check_device("gloo", torch.zeros(1))


def test_collectives_sum_and_max_over_a_real_process_group(tmp_path):
    """jobs.collective.reduce over two gloo ranks, with different values on each (as uneven data gives)."""
    import torch.multiprocessing as mp

    mp.spawn(_two_ranks, args=(str(tmp_path),), nprocs=2, join=True)
    got = sorted(p.read_text() for p in tmp_path.glob("rank-*"))
    assert got == ["[3.0, 1.0] [1.0] ['r0', 'r1']"] * 2


def _two_ranks(rank: int, out: str) -> None:
    import torch.distributed as dist

    from jobs.collective import gather, reduce

    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=2)
    summed = reduce([1.0 + rank, float(rank == 0)], torch.device("cpu"))
    maxed = reduce([float(rank)], torch.device("cpu"), op="max")
    names = gather(f"r{rank}")
    Path(out, f"rank-{rank}").write_text(f"{summed} {maxed} {names}")
    dist.destroy_process_group()


def _qlora_job(world: Path, tmp_path: Path):
    raw = load_raw(world / "jobs" / "qlora.yaml")
    raw["model"] = str(world / "init")  # the untrained base: placement is the subject
    raw["output"] = str(tmp_path / "runs")
    job, _ = build_job(raw)
    return job


def test_a_4bit_model_built_for_the_cpu_stays_on_the_cpu_where_cuda_exists(world, tmp_path, monkeypatch):
    """The export's parity check builds the as-trained QLoRA model on the CPU. On a GPU host transformers'
    bitsandbytes quantizer would put a model loaded without a device_map on the current CUDA device; here
    CUDA is made to look present, so that default would fail to allocate on it."""
    import bitsandbytes  # noqa: F401  (imported as on this CPU machine, before CUDA looks present)
    import transformers.integrations.bitsandbytes  # noqa: F401

    from jobs.model import build_model

    job = _qlora_job(world, tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    model = build_model(job, architectures.for_model_dir(job.model), torch.device("cpu"))
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_restored_optimizer_state_lands_on_the_workers_device(tmp_path, monkeypatch):
    """Rank 0 saves the optimizer state from its own GPU (cuda:0); every worker of a restart loads it. The state
    here is saved tagged with cuda:0, as a GPU run writes it; loaded without a map_location on a machine
    without that device it fails, with one it lands on the worker's device."""
    import ray.train
    from safetensors.torch import save_file

    from jobs.checkpoint import STATE_FILE, WEIGHTS_FILE
    from jobs.train_loop import Training, restore

    def training() -> Training:
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        return Training(
            model=model, core=model, params=list(model.parameters()), optimizer=optimizer,
            scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), scaler=torch.amp.GradScaler("cpu", enabled=False),
            autocast=None, input_dtype=None, deepspeed=False, ddp=False, max_grad_norm=None, device=torch.device("cpu"), adapters=False,
        )

    saved = training()
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    save_file({n: p.detach() for n, p in saved.core.named_parameters()}, ckpt / WEIGHTS_FILE)
    from torch import serialization

    with monkeypatch.context() as m:  # as torch.save writes tensors that live on cuda:0
        m.setattr(serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"step": 7, "optimizer": saved.optimizer.state_dict(), "scheduler": saved.scheduler.state_dict(), "scaler": saved.scaler.state_dict()}, ckpt / STATE_FILE)
    fresh = training()
    assert restore(fresh, ray.train.Checkpoint.from_directory(str(ckpt))) == 7
    state = fresh.optimizer.state_dict()["state"][0]
    assert state["exp_avg"].device.type == "cpu" and torch.equal(state["exp_avg"], saved.optimizer.state_dict()["state"][0]["exp_avg"])


CLUSTER_PROBE = """
import json, sys
import ray
from ray.cluster_utils import Cluster
from orchestrator import planner
from orchestrator.config import build_job, load_raw
from orchestrator.launch import Capacity, resources_for
from orchestrator.search import concurrency

# a GPU-less head (as every shipped cluster file has) and one node declaring 4 H100s: no CUDA is touched
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 0})
cluster.add_node(num_cpus=16, num_gpus=4, resources={"accelerator_type:H100": 1})
ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
raw = {**load_raw(sys.argv[1]), "model": sys.argv[2]}
out = {}
for gpu in ("auto", "on"):
    job, _ = build_job({**raw, "scaling": {"gpu": gpu, "workers": 2}}, cluster=True)
    capacity = Capacity.from_ray(embedded=False)
    res = resources_for(job, capacity)
    out[gpu] = {"use_gpu": res.use_gpu, "cpus_per_worker": res.cpus_per_worker}
search, _ = build_job({**raw, "scaling": {"workers": 1}, "tune": {"space": {"train.lr": {"grid": [1e-3, 1e-4]}}}}, cluster=True)
out["trials_at_once"] = concurrency(search, capacity)
budget = planner.budget_for(job, capacity=capacity)
out["budget"] = [budget.device, budget.memory, budget.source]
out["one_machine"] = [capacity.one_machine, Capacity.from_ray(embedded=True).one_machine]
print(json.dumps(out))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_gpu_decisions_come_from_the_ray_clusters_nodes_not_the_drivers_machine(world):
    """The driver of a cluster job runs on the head, which has no GPU (and no nvidia-smi): whether to use GPUs,
    each worker's CPUs, a search's trials at once and the planner's GPU memory come from Ray's nodes."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", CLUSTER_PROBE, str(world / "jobs" / "qlora.yaml"), str(world / "init")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    # the GPU node's 16 CPUs: half for training workers (the rest are Ray Data's), 8 / 4 GPUs = 2 per worker
    assert got["auto"] == got["on"] == {"use_gpu": True, "cpus_per_worker": 2}
    assert got["trials_at_once"] == 4  # one trial per GPU
    assert got["budget"] == ["gpu", 81_559 * 2**20, "Ray accelerator_type H100"]
    assert got["one_machine"] == [False, False]  # workers on other nodes read their data through Ray Data, never the driver's disk


def test_only_an_embedded_ray_of_one_node_lets_workers_read_the_drivers_disk():
    """Rows encoded once are read from the driver's disk (jobs/stream.py: plan(local=True)) only where every worker
    runs on this machine: not on a cluster, even one whose only node is up now (an autoscaler adds others)."""
    from orchestrator.launch.capacity import Capacity, Node

    assert Capacity((Node(2, 0),), "this machine").one_machine
    assert not Capacity((Node(2, 0),), "the Ray cluster").one_machine
    assert not Capacity((Node(2, 0), Node(2, 0)), "this machine").one_machine


def test_a_cluster_job_asking_for_gpus_is_not_refused_on_a_gpu_less_machine(world, tmp_path):
    """`rayft submit` validates on the user's laptop and the job's driver loads it again on the head; neither
    has a GPU, and neither may refuse `scaling.gpu: on` for it."""
    from orchestrator.config import ConfigError

    raw = {**load_raw(world / "jobs" / "qlora.yaml"), "model": str(world / "init"), "scaling": {"gpu": "on"}}
    job, _ = build_job(raw, cluster=True)
    assert job.scaling.gpu == "on"
    if not shutil.which("nvidia-smi"):  # here: refused for a run on this machine, with the fix
        with pytest.raises(ConfigError, match="scaling.gpu"):
            build_job(raw)


def test_set_up_chooses_the_torch_build_the_driver_supports():
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from choose_torch import choose

    assert choose("2.13.0", None) == (["torch==2.13.0"], "torch 2.13.0, CPU build (no NVIDIA driver: nvidia-smi not found)")
    header = "| NVIDIA-SMI 580.65.06   Driver Version: 580.65.06   CUDA Version: {} |"
    args, said = choose("2.13.0", header.format("13.0"))
    assert args[-1].endswith("/cu130") and "CUDA 13.0" in said
    assert choose("2.13.0", header.format("12.9"))[0][-1].endswith("/cu128")  # newest build the driver runs
    args, said = choose("2.13.0", header.format("12.2"))
    assert args == ["torch==2.13.0"] and "update the driver" in said
    assert choose("2.13.0", header.format("13.0"), "https://example.invalid/whl")[0][-1] == "https://example.invalid/whl"


def test_ddp_searches_for_unused_weights_only_where_a_trainable_one_can_miss_a_step(world, tmp_path):
    """The search is an extra graph walk every step; a VLM's trainable vision tower (full fine-tuning, or
    lora.train_vision) needs it, adapters on the language model do not (their two-worker DDP run in
    test_zero::test_adapters_data_parallel_over_two_workers[lora] trains without it)."""
    from jobs.train_loop import unused_parameters_possible

    arch = architectures.for_model_dir(world / "init")
    job = _qlora_job(world, tmp_path)
    assert not unused_parameters_possible(job, arch)
    assert unused_parameters_possible(job.model_copy(update={"lora": job.lora.model_copy(update={"train_vision": True})}), arch)
    assert unused_parameters_possible(job.model_copy(update={"method": "full"}), arch)


def test_the_eval_upcasts_only_the_answer_positions_logits():
    """answer_stats upcast the whole batch's logits to fp32 (tokens x vocabulary: ~30 GB at 16k tokens and a
    152k vocabulary) and took a log-softmax of all of them; now only the answer positions are upcast. Measured
    in a fresh process at a 151,646-token vocabulary: the extra peak is a fraction of the 16-bit logits
    (before: ~4x them); the numbers match a per-position computation."""
    code = """
import json, resource, torch, torch.nn.functional as F
from jobs.evaluate import answer_stats
from jobs.data import IGNORE_INDEX
torch.manual_seed(0)
logits = torch.randn(2, 512, 151646).to(torch.bfloat16)
labels = torch.full((2, 512), IGNORE_INDEX)
labels[0, 500:510] = logits[0, 499:509].float().argmax(-1)  # row 0 answered right, row 1 wrong at one position
labels[1, 300:305] = logits[1, 299:304].float().argmax(-1)
labels[1, 303] = (labels[1, 303] + 1) % 151646
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss, tokens, correct, count = answer_stats(logits, labels)
extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
picked = torch.cat([logits[0, 499:509], logits[1, 299:304]]).float()
want = F.cross_entropy(picked, torch.cat([labels[0, 500:510], labels[1, 300:305]]), reduction="sum")
print(json.dumps({"extra": extra, "logits": logits.numel() * 2, "loss": loss, "want": float(want), "stats": [tokens, correct, count]}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["stats"] == [15, 1, 2] and abs(got["loss"] - got["want"]) < 1e-3 * got["want"]
    assert got["extra"] < 0.25 * got["logits"], got


def test_the_planner_counts_what_a_gpu_worker_holds_outside_its_tensors():
    """The CUDA context and cuBLAS workspaces in every GPU worker, and NCCL's buffers once a worker has peers
    (allowed 0.5 GiB in all before, whatever the world size): 8 workers of a 7B LoRA plan 1 GiB more each than 1."""
    from orchestrator import planner
    from orchestrator.planner.memory import CUBLAS_WORKSPACE, CUDA_CONTEXT, NCCL_BUFFERS

    shape = planner.load_shape("7B")

    def overhead(workers: int, device: str = "gpu") -> int:
        job, _ = build_job({"model": "7B", "method": "lora", "data": {"train": "x.jsonl"}, "scaling": {"workers": workers}}, local_files=False)
        p = planner.plan(job, shape, device)
        return p.overhead - int(0.05 * (p.weights + p.gradients + p.optimizer + p.activations)) if device == "gpu" else p.overhead

    assert overhead(1) == CUDA_CONTEXT + CUBLAS_WORKSPACE
    assert overhead(8) == CUDA_CONTEXT + CUBLAS_WORKSPACE + NCCL_BUFFERS >= overhead(1) + 2**30
    assert overhead(8, "cpu") == overhead(1, "cpu")  # gloo on CPU: no NCCL


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_a_model_loads_straight_onto_its_gpu_not_through_host_memory(world, tmp_path, method):
    """Without a device_map transformers builds the whole model in host memory and rayft then copied it to the
    GPU: full fine-tuning's fp32 8B is 32 GB of host memory in each of a node's 8 workers at once. On CUDA the
    weights now load onto the worker's own GPU (cuda:3 here: not cuda:0); under ZeRO-3, zero.Init partitions
    them as they load (transformers refuses a device_map there); on the CPU the 4-bit base is still placed."""
    from jobs.model import load_kwargs

    job = _qlora_job(world, tmp_path).model_copy(update={"method": method})
    arch = architectures.for_model_dir(job.model)
    assert load_kwargs(job, arch, torch.device("cuda", 3), zero3=False)["device_map"] == {"": 3}
    assert load_kwargs(job, arch, torch.device("cpu"), zero3=False).get("device_map") == ({"": "cpu"} if method == "qlora" else None)
    if method == "full":
        assert "device_map" not in load_kwargs(job, arch, torch.device("cuda", 3), zero3=True)


def test_auto_attention_is_flash_attention_2_on_a_gpu_where_it_imports_and_an_explicit_choice_is_kept(world, monkeypatch):
    """train.attn_implementation: auto asks for FlashAttention 2 only on a CUDA device, in half precision, where
    flash_attn imports; else transformers' default (sdpa). An explicit choice loads as asked; flash_attention_2 on a
    worker without the package (a cluster's, not checked before launch) fails naming the option."""
    import torch

    from jobs import model
    from orchestrator import architectures
    from orchestrator.config import checks

    raw = load_raw(world / "jobs" / "base.yaml")
    job = lambda **sets: build_job({**raw, **sets})[0]  # noqa: E731
    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.setattr(checks, "flash_attn_importable", lambda: True)
    assert model.attn_implementation(job(precision="bf16"), gpu) == "flash_attention_2"
    assert model.attn_implementation(job(precision="fp32"), gpu) is None
    assert model.attn_implementation(job(precision="bf16"), cpu) is None
    monkeypatch.setattr(checks, "flash_attn_importable", lambda: False)
    assert model.attn_implementation(job(precision="bf16"), gpu) is None
    with pytest.raises(RuntimeError, match="train.attn_implementation: flash_attention_2, but the flash_attn package"):
        model.attn_implementation(build_job({**raw, "precision": "bf16", "train": {**raw["train"], "attn_implementation": "flash_attention_2"}}, cluster=True)[0], gpu)
    eager = job(train={**raw["train"], "attn_implementation": "eager"})
    loaded = model.load_base(eager, architectures.for_model_dir(eager.model_dir), cpu)
    assert loaded.config._attn_implementation == "eager" and loaded.config.text_config._attn_implementation == "eager"


def test_a_trial_trained_in_its_own_actor_reserves_its_workers_gpu_and_trains_on_the_one_ray_leaves_visible(world, monkeypatch):
    """A search trial of one worker on one machine is trained in Tune's trial actor (jobs/tune_worker.py), with no
    TorchTrainer: the actor must reserve the worker's GPU and CPUs itself (else Ray gives it no GPU, and
    CUDA_VISIBLE_DEVICES is empty), and train on cuda:0, the GPU Ray leaves visible to it. Trials of several
    workers, or on a cluster, keep their TorchTrainer, whose workers reserve what they use."""
    from jobs.driver import Resources
    from jobs.tune_worker import device_for
    from orchestrator.trial import in_trial_actor, trial_resources

    raw = {**load_raw(world / "jobs" / "qlora.yaml"), "model": str(world / "init"), "tune": {"space": {"train.lr": {"grid": [1e-3, 2e-3]}}}}
    job, _ = build_job(raw)
    assert in_trial_actor(job, one_machine=True) and trial_resources(Resources(True, 4), True) == {"cpu": 4, "gpu": 1}
    assert trial_resources(Resources(False, 2), True) == {"cpu": 2, "gpu": 0}
    assert not in_trial_actor(job, one_machine=False)  # a cluster: the trial's worker may land on any node
    two, _ = build_job({**raw, "scaling": {"workers": 2}})
    searched, _ = build_job({**raw, "tune": {"space": {"scaling.workers": {"grid": [1, 2]}}}})
    assert not in_trial_actor(two, True) and not in_trial_actor(searched, True)
    assert trial_resources(Resources(True, 4), False) == {"cpu": 0, "memory": 1}  # it only drives its TorchTrainer
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_for(True) == torch.device("cuda", 0) and device_for(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="reserved a GPU but CUDA sees none"):
        device_for(True)
