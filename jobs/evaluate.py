"""Eval loss and answer exact-match accuracy.

Accuracy is computed under teacher forcing: an example is correct when the argmax at every answer position
(the answer's tokens and its end-of-turn token) equals the target. That is exactly the condition for greedy
decoding to reproduce the answer and stop, so it equals generate-and-compare at a fraction of the cost.
"""

from __future__ import annotations

from typing import Any

from jobs import packing
from jobs.collective import reduce
from jobs.data import IGNORE_INDEX


def to_device(batch: dict[str, Any], device: Any, float_dtype: Any = None) -> dict[str, Any]:
    """Move a batch; under DeepSpeed bf16/fp16 the weights are in that dtype, so float inputs follow."""
    return {k: v.to(device, float_dtype) if float_dtype is not None and v.is_floating_point() else v.to(device) for k, v in batch.items()}


def answer_stats(logits: Any, labels: Any) -> tuple[float, int, int, int]:
    """(summed token loss, answer tokens, exactly-correct examples, examples) for one batch, from the full
    sequence's logits. Only the answer positions' logits are upcast to fp32: a copy of the whole batch's (tokens x
    vocabulary, ~30 GB at 16k tokens and a 152k vocabulary) would be the eval's largest tensor."""
    targets = labels[:, 1:]
    rows, positions = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return answer_counts(logits[rows, positions], targets[rows, positions], rows)


def answer_counts(logits: Any, targets: Any, rows: Any) -> tuple[float, int, int, int]:
    """answer_stats' numbers from the answer positions' logits alone (answer_logits' output, rows: the example of
    each answer token): (summed token loss, answer tokens, exactly-correct examples, examples). An example is a row
    with an answer: a filler row (jobs/data.filler_row) has none, so it is not one."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()  # (answer tokens, vocabulary)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    examples, owner = torch.unique(rows, return_inverse=True)
    misses = torch.zeros(len(examples), dtype=torch.long, device=logits.device)
    misses.index_add_(0, owner, (logits.argmax(-1) != targets).long())
    return float(loss), len(targets), int((misses == 0).sum()), len(examples)


def keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes transformers' logits_to_keep (its language-model head then runs at the
    positions given only). `model`: the transformers model, or peft's wrapper of it."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(type(base).forward).parameters


def answer_logits(model: Any, batch: dict[str, Any], labels: Any, keep: bool) -> tuple[Any, Any, Any]:
    """The logits that predict answer tokens, and only those: (logits [answer tokens, vocabulary], their targets,
    the row of each). In VLM SFT most positions are image and prompt tokens without loss, yet the head and the
    loss's fp32 copy would cover every one (with a 152k vocabulary the step's largest tensor). keep (keeps_logits):
    the head runs at the positions where any row of the batch has an answer token next; else at every position,
    and the answer positions are picked after. A packed batch (jobs/packing.py): the rows are those of its one
    sequence, and the model runs without a cache, so that transformers builds the mask from the positions.
    labels: best on the CPU, as collate made them (the callers keep them there): the positions are found with nonzero,
    which on a GPU tensor makes the host wait for the GPU at every micro batch; the indices then go to the model's
    device."""
    device = batch["input_ids"].device
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    owner = None
    if packing.is_packed(batch):
        owner = packing.row_ids(batch["position_ids"])[:, 1:]  # the row each target token belongs to
        batch = {**packing.model_inputs(model, batch), "use_cache": False}
    if keep:
        positions = mask.any(dim=0).nonzero(as_tuple=True)[0]  # a tensor, even empty (an int 0 would keep all)
        mask, targets = mask[:, positions], targets[:, positions]
        positions = positions.to(device, non_blocking=True)
        logits = model(**batch, logits_to_keep=positions).logits
        owner = owner[:, positions] if owner is not None else None
    else:
        logits = model(**batch).logits[:, :-1]
    rows, cols = mask.nonzero(as_tuple=True)
    targets = targets[rows, cols].to(device, non_blocking=True)
    rows, cols = rows.to(device, non_blocking=True), cols.to(device, non_blocking=True)
    return logits[rows, cols], targets, owner[rows, cols] if owner is not None else rows


def answer_loss(model: Any, batch: dict[str, Any], labels: Any, keep: bool) -> Any:
    """The micro batch's loss as the model's own (the mean cross-entropy over its answer tokens, in fp32), from
    answer_logits; 0 for a batch without answers (a filler-only one) instead of NaN."""
    import torch.nn.functional as F

    logits, targets, _ = answer_logits(model, batch, labels, keep)
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(1, len(targets))


def evaluate(model: Any, batches: list[dict[str, Any]], device: Any, autocast: Any, float_dtype: Any = None, keep: bool = False) -> dict[str, float]:
    """Summed over this worker's batches and then over all workers (a collective when distributed).
    keep: the head runs at the answer positions only (answer_logits)."""
    import torch

    was_training = model.training
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad(), autocast():
        for batch in batches:
            labels = batch["labels"]  # on the CPU (answer_logits)
            batch = to_device({k: v for k, v in batch.items() if k != "labels"}, device, float_dtype)
            stats = answer_counts(*answer_logits(model, batch, labels, keep))
            totals = [a + b for a, b in zip(totals, stats, strict=True)]
    loss, tokens, correct, count = reduce(totals, device)  # every rank, with or without rows
    model.train(was_training)
    return {"eval_loss": loss / max(tokens, 1), "eval_accuracy": correct / max(count, 1), "eval_examples": int(count)}
