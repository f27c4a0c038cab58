"""DeepSpeed ZeRO: the generated config, the engine, and consolidation of sharded checkpoints.

The job's precision maps onto DeepSpeed's bf16 / fp16 (dynamic loss scaling) / fp32; micro batch and
gradient accumulation come from `train`; `deepspeed.overrides` is merged last and recorded.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

from orchestrator.architectures import Architecture
from orchestrator.config import JobConfig
from orchestrator.dotted import flatten, set_in

CONFIG_FILE = "deepspeed.json"


def ds_config(job: JobConfig, world_size: int, gpu: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the DeepSpeed config, the keys the user's overrides changed: {dotted key: [generated, override]}).
    gpu: offloaded state goes to pinned host memory (page-locked: host-device copies at full speed, as
    peers configure it); a CPU run has no device to copy to."""
    ds = job.deepspeed
    assert ds is not None
    zero: dict[str, Any] = {"stage": ds.stage}
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
    if ds.offload_params == "cpu":
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": job.train.micro_batch_size,
        "gradient_accumulation_steps": job.train.grad_accum,
        "train_batch_size": job.train.micro_batch_size * job.train.grad_accum * world_size,
        "gradient_clipping": job.train.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": job.precision == "bf16"},
        "fp16": {"enabled": job.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # The client optimizer (torch AdamW) is used unless offloading, which needs DeepSpeedCPUAdam;
        # this also avoids building fused_adam on CPU.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer == "cpu":
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": job.train.lr, "weight_decay": job.train.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
        }
    generated = flatten(config)
    for key, value in flatten(ds.overrides).items():
        set_in(config, key, copy.deepcopy(value))
    changed = {k: [generated.get(k), v] for k, v in flatten(ds.overrides).items() if generated.get(k) != v}
    return config, changed


def write_config(run_dir: Path, config: dict[str, Any], changed: dict[str, Any]) -> None:
    (run_dir / CONFIG_FILE).write_text(json.dumps({"config": config, "overrides_changed": changed}, indent=2))


def use_prebuilt_ops() -> None:
    """DeepSpeed's JIT-built ops (CPU Adam, shm comm) from where `make setup` built them (scripts/build_ds_ops.py):
    <venv>/torch_extensions, unless TORCH_EXTENSIONS_DIR says otherwise. Without it, a process started outside
    the Makefile (`rayft train` itself, every Ray worker) would build them again in ~/.cache."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))


def init_comm(device: Any) -> None:
    """Point DeepSpeed's comm layer at the process group Ray Train already created (gloo on CPU, nccl on GPU)."""
    use_prebuilt_ops()
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", auto_mpi_discovery=False)


def hf_deepspeed_config(job: JobConfig, config: dict[str, Any], arch: Architecture) -> Any:
    """Under ZeRO-3, transformers builds the model inside deepspeed.zero.Init and loads only each rank's
    partition, so no worker ever holds the whole model. transformers holds this object weakly: the caller
    keeps it referenced for as long as the model is trained (jobs/train_loop.py: Training.zero3_config)."""
    if job.deepspeed is None or job.deepspeed.stage != 3:
        return None
    from transformers.integrations import HfDeepSpeedConfig

    from jobs.model import model_class

    # import the model class first: under zero.Init, a first import of transformers model code fails with
    # "TypeError: Signature mismatch ... tensor_pynew" (torch 2.13, deepspeed 0.19)
    model_class(arch)
    return HfDeepSpeedConfig(config)


def initialize(model: Any, config: dict[str, Any], params: list[Any], lr: float, weight_decay: float, scheduler_fn: Any) -> tuple[Any, Any, Any]:
    """(engine, optimizer, scheduler). The scheduler steps at gradient-accumulation boundaries inside engine.step()."""
    import deepspeed
    import torch

    optimizer = None if "optimizer" in config else torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=params,
        optimizer=optimizer,
        lr_scheduler=scheduler_fn,
        config=config,
        dist_init_required=False,  # Ray Train already set up the process group
    )
    return engine, optimizer, scheduler


def consolidate(checkpoint_dir: str | Path, model_dir: Path, dtype: Any, stage: int) -> None:
    """Write the ZeRO checkpoint as HF safetensors shards in `dtype`. Stages 1-3: DeepSpeed's lazy
    consolidation, tensor by tensor, so the driver never holds more than one copy of the model. Stage 0
    has no partitions: the module's weights are whole in the model-states file."""
    if stage == 0:
        import json

        import torch
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        # Memory-mapped, and converted one output shard at a time: at most one shard in the export dtype.
        tag = (Path(checkpoint_dir) / "latest").read_text().strip()
        states = torch.load(Path(checkpoint_dir) / tag / "mp_rank_00_model_states.pt", map_location="cpu", mmap=True, weights_only=False)
        module = states["module"]
        split = split_torch_state_dict_into_shards(module, max_shard_size="2GB")
        model_dir.mkdir(parents=True, exist_ok=True)
        for filename, keys in split.filename_to_tensors.items():
            # copies (copy=True): tied weights share storage, which safetensors refuses to write twice
            shard = {k: module[k].to(dtype=dtype if module[k].is_floating_point() else None, copy=True) for k in keys}
            save_file(shard, str(model_dir / filename), metadata={"format": "pt"})
            del shard
        if split.is_sharded:
            index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
            (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_state_dict

    convert_zero_checkpoint_to_state_dict(str(checkpoint_dir), str(model_dir), dtype=dtype, max_shard_size="2GB", safe_serialization=True)


def memory_breakdown(engine: Any, world_size: int) -> dict[str, int]:
    """Bytes this worker holds for parameters and optimizer state (measured from the live tensors), and
    for gradients (computed: DeepSpeed frees them after each step; stage >= 2 keeps 1/N of them)."""
    stage = engine.zero_optimization_stage()
    module_ptrs = set()
    params = grads = 0
    for p in engine.module.parameters():
        local = getattr(p, "ds_tensor", p)  # ZeRO-3: this rank's partition
        params += local.numel() * local.element_size()
        module_ptrs.add(local.data_ptr())
        if p.requires_grad:
            full = getattr(p, "ds_numel", p.numel()) * p.element_size()
            grads += full // world_size if stage >= 2 else full
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    seen: set[int] = set()
    optimizer = 0
    tensors = [t for state in base.state.values() for t in state.values() if hasattr(t, "data_ptr")]
    tensors += [p for group in base.param_groups for p in group["params"] if p.data_ptr() not in module_ptrs]
    # fp32 master partitions: ZeRO-1/2 and ZeRO-3 keep them in their own attributes (ZeRO-3 swaps them into
    # the torch optimizer only during step)
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        tensors += [t for t in getattr(engine.optimizer, attr, None) or [] if hasattr(t, "data_ptr")]
    for t in tensors:  # moments + fp32 master partitions, each counted once
        if t.data_ptr() not in seen and t.numel() > 1:
            seen.add(t.data_ptr())
            optimizer += t.numel() * t.element_size()
    return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optimizer}
