"""Generation-based evaluation (eval.generate): greedy generate() on the first eval rows, exact match on
normalized text.

The prompt is the training encoding of the row (jobs/data.py: encode_row, chat template, images, earlier
turns and their answers) cut where the last answer starts, so the model is asked exactly what training
scored it on. Only the new tokens are decoded. One row at a time: no left-padding rules per architecture.

Under DeepSpeed ZeRO-3 the parameters are partitioned and every forward pass gathers them with a
collective, so every rank must run the same number of forward passes: every rank generates every row
(the same rows, read from the same file), with synced_gpus=True (a rank that hits eos keeps stepping until
all have). No row split, no padding with repeats, no count all-reduce: nothing that can differ between
ranks. Elsewhere (plain, DDP, ZeRO-1/2: full weights on every rank) rank 0 generates alone on the
unwrapped model, which needs no collective; only rank 0's metrics reach Ray Train and metrics.jsonl.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import data as data_mod
from orchestrator import architectures
from orchestrator.config import JobConfig

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """Lower case, whitespace collapsed, stripped, trailing punctuation dropped: 'Rouge.\\n' == 'rouge'."""
    return _SPACE.sub(" ", text.lower()).strip().rstrip(string.punctuation + " ").strip()


@dataclass
class Prompt:
    inputs: dict[str, Any]
    """Batch-of-one tensors for generate(): input_ids, attention_mask, image and token-level tensors."""
    prompt: str
    """The user's text of the turn answered (not the chat template)."""
    expected: str
    """The last assistant turn's text."""


def prompt_for(row: dict[str, Any], i: int, job: JobConfig, processor: Any, vlm: bool, data_file: Path) -> Prompt | None:
    """The row's training encoding up to where its last answer starts; None for a row longer than
    data.max_length (training never sees it either)."""
    import torch

    tokenizer = getattr(processor, "tokenizer", processor)
    enc = data_mod.encode_row(row, i, job.data, processor, vlm, data_file)
    if len(enc.input_ids) > job.data.max_length:
        return None
    conv = data_mod.conversation(row, job.data, vlm)
    last = len(conv.messages) - 1
    n = len(data_mod.answer_token_ids(tokenizer, conv.text(last)))  # encode_row ends with the last answer + eos
    ids = enc.input_ids[:-n]
    inputs: dict[str, Any] = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
    for key, value in enc.extras.items():
        inputs[key] = value[:-n][None] if key in data_mod.TOKEN_LEVEL_FILL else value
    user = next(conv.text(k) for k in range(last - 1, -1, -1) if conv.messages[k]["role"] == "user")
    return Prompt(inputs, user, conv.text(last))


def prompts(job: JobConfig, processor: Any, arch: architectures.Architecture, source: str | Path | None = None) -> list[Prompt]:
    """The first eval.generate.samples rows of data.eval (or of `source`), read alone whatever the file's size."""
    assert job.eval.generate is not None
    source = Path(source or job.data.eval or job.data.train)
    head = data_mod.read_head(source, job.eval.generate.samples).to_pylist()[: job.eval.generate.samples]
    found = (prompt_for(row, i, job, processor, arch.kind == "vlm", source) for i, row in enumerate(head))
    return [p for p in found if p is not None]


def unwrap(model: Any) -> Any:
    """The module that has .generate: a DeepSpeed engine's or DDP's .module, else the model itself (a DeepSpeed
    engine forwards unknown attributes, .generate included, to its module: hasattr cannot tell them apart)."""
    while type(model).__name__ in ("DeepSpeedEngine", "DistributedDataParallel"):
        model = model.module
    return model


def generate(
    model: Any,
    processor: Any,
    job: JobConfig,
    rows: list[Prompt],
    device: Any = None,
    autocast: Any = None,
    input_dtype: Any = None,
    synced_gpus: bool = False,
) -> dict[str, Any]:
    """Greedy answers for the rows: {"accuracy", "samples": [{prompt, expected, generated, correct}]}.
    Restores the model's train/eval mode. synced_gpus: ZeRO-3 (every rank must call this with the same rows)."""
    from contextlib import nullcontext

    import torch

    assert job.eval.generate is not None
    module = unwrap(model)
    tokenizer = getattr(processor, "tokenizer", processor)
    config_eos = getattr(getattr(module, "generation_config", None), "eos_token_id", None)
    eos = sorted({tokenizer.eos_token_id, *(config_eos if isinstance(config_eos, list) else [config_eos])} - {None})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    if device is None:
        device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    samples = []
    try:
        with torch.no_grad(), (autocast() if autocast else nullcontext()):
            for row in rows:
                inputs = {k: v.to(device, input_dtype) if input_dtype is not None and v.is_floating_point() else v.to(device) for k, v in row.inputs.items()}
                out = module.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=job.eval.generate.max_new_tokens,
                    eos_token_id=eos,
                    pad_token_id=pad,
                    synced_gpus=synced_gpus,
                )
                text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                correct = normalize(text) == normalize(row.expected)
                samples.append({"prompt": row.prompt, "expected": row.expected, "generated": text.strip(), "correct": correct})
    finally:
        module.train(was_training)
    return {"accuracy": sum(s["correct"] for s in samples) / max(len(samples), 1), "samples": samples}


class EvalGenerator:
    """What a training worker keeps between evals: the encoded prompts, and whether this rank generates."""

    def __init__(self, job: JobConfig, arch: architectures.Architecture, rank: int, zero3: bool):
        from jobs.model import load_processor

        self.job, self.zero3 = job, zero3
        self.active = zero3 or rank == 0
        self.processor = load_processor(job.model_dir, arch) if self.active else None
        self.rows = prompts(job, self.processor, arch, job.data.eval) if self.active else []

    def __call__(self, training: Any, device: Any) -> dict[str, Any] | None:
        """The generations record on a rank that generates; None elsewhere."""
        import time

        if not self.active:
            return None
        t0 = time.time()
        result = generate(training.core, self.processor, self.job, self.rows, device, training.autocast, training.input_dtype, synced_gpus=self.zero3)
        return {**result, "generate_s": round(time.time() - t0, 3)}


def manifest_section(job: JobConfig, records: list[dict[str, Any]], at_checkpoint: dict[str, Any], parity: dict[str, Any]) -> dict[str, Any]:
    """The manifest's `generation` (eval.generate only): the run's answers at the exported checkpoint's step
    (else its last generations record in metrics.jsonl) and the merged model's, from the export's check."""
    if not job.eval.generate:
        return {}
    generations = [r for r in records if r.get("event") == "generations"]
    trained = next((r for r in reversed(generations) if r["step"] == at_checkpoint.get("step")), generations[-1] if generations else None)
    return {"generation": {
        "max_new_tokens": job.eval.generate.max_new_tokens,
        "trained": {k: trained[k] for k in ("step", "accuracy", "samples")} if trained else None,
        "merged": parity.get("generation"),
    }}
