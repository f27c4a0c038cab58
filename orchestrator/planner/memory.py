"""The memory model: predicted bytes per GPU (or per CPU worker) for a job on a model shape, term by term.

The model, per worker:
  weights      every parameter by storage: fp32 4 B, bf16/fp16 2 B, NF4/FP4 0.5 B plus quantization constants
               (an fp32 absmax per 64 weights: 4.5 bits; double quantization: 8-bit absmax + an fp32 one per
               256 blocks: about 4.127 bits). Full fine-tuning without DeepSpeed keeps fp32 master weights
               (maths in the run's precision under autocast); DeepSpeed holds them in the run's precision.
  gradients    one per trainable parameter, in its storage dtype; DDP adds its bucket copy.
  optimizer    AdamW's two fp32 moments (8 B), plus fp32 master weights (4 B) where DeepSpeed holds the
               weights in 16 bits (and in every ZeRO stage >= 1, which keeps its own fp32 partition).
  ZeRO         stage 1 partitions optimizer state over N workers, 2 also gradients, 3 also weights;
               CPU offload moves optimizer state (and at stage 3 the weights) to host memory.
  activations  what autograd saves, per token and layer, from the layer's widths (SDPA attention, no
               attention matrix): decoder 6h + 3q + 2kv + 4i elements (RMSNorms keep an fp32 input, SwiGLU
               four i-wide tensors), ViT 11h + 2i; logits 10 B per vocabulary entry (16-bit); LoRA dropout adds a
               copy + mask of each adapted input (a 1-byte mask on CUDA, fp32 on CPU). Gradient checkpointing keeps each layer's input and one
               layer's activations. A frozen vision tower saves nothing. Full fine-tuning under autocast also
               keeps a 16-bit copy of every weight until backward.
  eval         under no_grad: the 16-bit logits of a micro batch and fp32 logits of its answer positions only
               (jobs/evaluate.answer_stats), less than training's logits term, so training's peak stands.
  overhead     GPU: CUDA context, cuBLAS workspaces and (with peers) NCCL's buffers, plus allocator slack; CPU worker: the Python/torch/Ray
               runtime (measured). DeepSpeed adds its gradient reduce bucket, ZeRO-3 the gathered weights
               of the block running and the one prefetched.

The shapes it reads (parameter tensors, the widths of each block stack) are orchestrator/planner/shapes.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from orchestrator import architectures
from orchestrator.config import JobConfig
from orchestrator.dotted import flatten
from orchestrator.planner.shapes import ModelShape, Stack, lora_target_tensors

GiB = 2**30
Device = Literal["gpu", "cpu"]

QUANT_BLOCK = 64  # bitsandbytes 4-bit block size
NESTED_BLOCK = 256  # double quantization: absmax blocks per fp32 scale
# What a GPU worker holds outside torch's caching allocator (max_memory_reserved does not see it; NVML does).
# Estimates from the libraries' defaults, to be replaced by bench/gpu_check.py's NVML - reserved readings:
CUDA_CONTEXT = int(0.6 * GiB)  # one process's CUDA context with torch's kernels (lazy module loading)
CUBLAS_WORKSPACE = 64 * 2**20  # cuBLAS + cuBLASLt workspaces of the compute stream
NCCL_BUFFERS = int(1.0 * GiB)  # NCCL's channel buffers with peers (up to 32 channels x 4 MiB each way) + NVLS on NVSwitch
ALLOCATOR_SLACK = 0.05  # caching-allocator fragmentation, as a share of the tensors
# Python + torch + transformers + Ray in one CPU worker (bench/planner_calibration.py)
CPU_RUNTIME = int(1.0 * GiB)
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


def four_bit_bytes(numel: int, double_quant: bool) -> int:
    """Packed 4-bit weights plus bitsandbytes' quantization state for one Linear."""
    blocks = math.ceil(numel / QUANT_BLOCK)
    packed, code = math.ceil(numel / 2), 16 * 4
    if not double_quant:
        return packed + 4 * blocks + code  # fp32 absmax per block: 4.5 bits per weight
    # 8-bit absmax per block, an fp32 scale per 256 blocks, their 256-entry code and an offset: ~4.127 bits
    return packed + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + 256 * 4 + 4 + code


@dataclass(frozen=True)
class Plan:
    label: str
    device: Device
    workers: int
    total_params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    overhead: int
    offloaded: int = 0
    """Bytes per worker moved to host memory by DeepSpeed CPU offload (on a CPU run they stay in the total)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Dotted job keys that turn the planned job into this configuration (empty for the job itself)."""

    @property
    def total(self) -> int:
        device = self.weights + self.gradients + self.optimizer + self.activations + self.overhead
        return device + (self.offloaded if self.device == "cpu" else 0)

    @property
    def states(self) -> int:
        """Weights + gradients + optimizer state, wherever they live (what calibration measures)."""
        return self.weights + self.gradients + self.optimizer + self.offloaded

    def as_dict(self) -> dict[str, Any]:
        keys = (
            "label",
            "device",
            "workers",
            "total_params",
            "trainable_params",
            "weights",
            "gradients",
            "optimizer",
            "activations",
            "overhead",
            "offloaded",
            "overrides",
        )
        return {**{k: getattr(self, k) for k in keys}, "total": self.total}


def plan(
    job: JobConfig,
    shape: ModelShape,
    device: Device,
    label: str = "job",
    overrides: dict[str, Any] | None = None,
) -> Plan:
    """Predicted bytes per worker for `job` on `device`."""
    arch = architectures.for_model_type(shape.model_type)
    ds = job.deepspeed
    workers = job.scaling.workers
    stage = ds.stage if ds else None
    precision_bytes = 2 if job.precision in ("bf16", "fp16") else 4
    adapters = job.method in ("lora", "qlora")

    # weights, and which parameters train
    if job.method == "full":
        stored = 4 if ds is None else precision_bytes  # fp32 master weights under autocast; DeepSpeed: 16-bit
        trainable = sum(t.numel for t in shape.tensors if not _under(t.name, job.freeze))
        weights = shape.total_params * stored
        trainable_bytes = stored
    else:
        targets = lora_target_tensors(job, shape)
        trainable = sum(job.lora.rank * (t.linear[0] + t.linear[1]) for t in targets if t.linear)
        weights = 0
        for t in shape.tensors:
            quantized = job.quantized and t.linear is not None and not _under(t.module, arch.keep_out_of_4bit)
            weights += (
                four_bit_bytes(t.numel, job.quantization.double_quant)
                if quantized
                else t.numel * precision_bytes
            )
        # peft keeps adapters in fp32; DeepSpeed casts them to the run's precision
        trainable_bytes = 4 if ds is None else precision_bytes
        weights += trainable * trainable_bytes

    gradients = trainable * trainable_bytes
    master = ds is not None and (stage >= 1 or precision_bytes == 2)
    optimizer = trainable * (8 + (4 if master else 0))
    if ds is None and workers > 1:
        gradients *= 2  # DDP's gradient buckets are a second copy
    offloaded = 0
    if stage is not None and stage >= 1:
        optimizer //= workers
    if stage is not None and stage >= 2:
        gradients //= workers
    if stage == 3:
        # adapter weights are not partitioned (lora under ZeRO-3 is refused); the base is
        weights //= workers
    if ds is not None and ds.offload_optimizer == "cpu":
        offloaded += optimizer + trainable * 4 // workers  # and DeepSpeedCPUAdam's fp32 gradient partition
        optimizer = 0
    if ds is not None and ds.offload_params == "cpu":
        offloaded += weights
        weights = 0

    activations = _activations(job, shape, precision_bytes)
    if adapters and job.lora.dropout > 0:
        # CUDA's fused dropout keeps a 1-byte mask; the CPU kernel a mask in the input's (the adapter's) dtype
        mask = 1 if device == "gpu" else trainable_bytes
        activations += _lora_dropout_bytes(job, shape, precision_bytes + mask)
    if job.method == "full" and ds is None and job.precision != "fp32":
        activations += 2 * sum(t.numel for t in shape.tensors if t.linear)  # autocast's 16-bit weight copies

    tensors = weights + gradients + optimizer + activations
    overhead = gpu_runtime(workers) + int(ALLOCATOR_SLACK * tensors) if device == "gpu" else CPU_RUNTIME
    if ds is not None:
        bucket = flatten(ds.overrides).get("zero_optimization.reduce_bucket_size", DS_REDUCE_BUCKET)
        if not isinstance(bucket, int | float) or isinstance(bucket, bool):  # "auto" (HF's configs): DeepSpeed's own choice
            bucket = DS_REDUCE_BUCKET
        overhead += min(int(bucket), trainable) * precision_bytes
    if stage == 3:  # the gathered parameters of the block running and the one prefetched
        largest = max(shape.text.layer_params(), shape.vocab * shape.text.hidden)
        overhead += 2 * largest * precision_bytes
    return Plan(
        label,
        device,
        workers,
        shape.total_params,
        trainable,
        weights,
        gradients,
        optimizer,
        activations,
        overhead,
        offloaded,
        dict(overrides or {}),
    )


def gpu_runtime(workers: int) -> int:
    """Bytes a GPU worker holds outside its tensors: the CUDA context, cuBLAS workspaces, and NCCL's buffers
    once it has peers (a single worker makes no NCCL communicator)."""
    return CUDA_CONTEXT + CUBLAS_WORKSPACE + (NCCL_BUFFERS if workers > 1 else 0)


def micro_tokens(job: JobConfig) -> int:
    """The most tokens of one worker's micro batch (image tokens included): data.batch_tokens under batching tokens
    or packed, else micro_batch_size rows of data.max_length."""
    if job.data.batching in ("tokens", "packed") and job.data.batch_tokens is not None:
        return job.data.batch_tokens
    return job.train.micro_batch_size * job.data.max_length


def _activations(job: JobConfig, shape: ModelShape, element: int) -> int:
    tokens = micro_tokens(job)
    logits = tokens * shape.vocab * (element + 8)  # the logits, their fp32 upcast for the loss, log-softmax
    total = logits + _stack_bytes(shape.text, tokens, element, job.train.gradient_checkpointing)
    if shape.vision is not None and _vision_trains(job, shape):
        per_image = shape.image_tokens or dynamic_patches(job, shape)
        images = job.train.micro_batch_size
        if job.data.batching in ("tokens", "packed"):  # as many rows as fit the budget: short rows, many images
            images = max(1, tokens // max(1, min(job.data.max_length, shape.image_tokens or job.data.max_length)))
        total += _stack_bytes(shape.vision, images * per_image, element, job.train.gradient_checkpointing)
    return total


def dynamic_patches(job: JobConfig, shape: ModelShape) -> int:
    """Vision patches of a row's images at dynamic resolution (Qwen2-VL): as many as its longest row's tokens
    allow (every token an image token), or fewer where data.max_pixels caps each image's pixels."""
    most = shape.patches_per_token * job.data.max_length
    if job.data.max_pixels is not None and shape.patch_size:
        return min(most, job.data.max_pixels // shape.patch_size**2)
    return most


def _layer_elements(stack: Stack) -> int:
    """Activation elements (16-bit) one layer saves for backward, per token."""
    if stack.gated_mlp:  # RMSNorms (fp32 input + output), q/k/v/attn out/o_proj input, SwiGLU's four
        return 6 * stack.hidden + 3 * stack.q_dim + 2 * stack.kv_dim + 4 * stack.intermediate
    return (
        11 * stack.hidden + 2 * stack.intermediate
    )  # LayerNorms, q/k/v/out/out_proj input, fc1 out + GELU


def _stack_bytes(stack: Stack, tokens: int, element: int, checkpointing: bool) -> int:
    per_layer = _layer_elements(stack) * tokens * element
    if checkpointing:  # each layer's input, and one layer recomputed at a time in backward
        return stack.layers * stack.hidden * tokens * element + per_layer
    return stack.layers * per_layer


def _vision_trains(job: JobConfig, shape: ModelShape) -> bool:
    """A frozen vision tower whose input needs no gradient saves nothing for backward."""
    if job.method == "full":
        return not _under(shape.vision_prefix, job.freeze)
    return job.lora.train_vision


def _lora_dropout_bytes(job: JobConfig, shape: ModelShape, per_element: int) -> int:
    """peft's dropout on each adapted input: a copy of the input (what the adapter's matmul saves) plus the
    dropout mask; per_element is the two together."""
    targets = lora_target_tensors(job, shape)
    per_token = sum(t.linear[0] * per_element for t in targets if t.linear)
    layers = shape.text.layers + (shape.vision.layers if shape.vision and job.lora.train_vision else 0)
    if job.train.gradient_checkpointing:
        per_token //= max(1, layers)
    return per_token * micro_tokens(job)




def _under(name: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)
