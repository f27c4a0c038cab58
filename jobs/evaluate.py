"""Eval loss and answer exact-match accuracy.

Accuracy is computed under teacher forcing: an example is correct when the argmax at every answer position
(the answer's tokens and its end-of-turn token) equals the target. That is exactly the condition for greedy
decoding to reproduce the answer and stop, so it equals generate-and-compare at a fraction of the cost.
"""

from __future__ import annotations

from typing import Any

from jobs.collective import reduce
from jobs.data import IGNORE_INDEX


def to_device(batch: dict[str, Any], device: Any, float_dtype: Any = None) -> dict[str, Any]:
    """Move a batch; under DeepSpeed bf16/fp16 the weights are in that dtype, so float inputs follow."""
    return {k: v.to(device, float_dtype) if float_dtype is not None and v.is_floating_point() else v.to(device) for k, v in batch.items()}


def answer_stats(logits: Any, labels: Any) -> tuple[float, int, int, int]:
    """(summed token loss, answer tokens, exactly-correct examples, examples) for one batch.
    Only the answer positions' logits are upcast to fp32: a copy of the whole batch's (tokens x vocabulary,
    ~30 GB at 16k tokens and a 152k vocabulary) would be the eval's largest tensor."""
    import torch
    import torch.nn.functional as F

    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    rows, positions = mask.nonzero(as_tuple=True)
    answer_logits = logits[rows, positions].float()  # (answer tokens, vocabulary)
    answer_targets = targets[rows, positions]
    loss = F.cross_entropy(answer_logits, answer_targets, reduction="sum")
    misses = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
    misses.index_add_(0, rows, (answer_logits.argmax(-1) != answer_targets).long())
    scored = mask.any(dim=1)  # a filler row (jobs/data.filler_row) has no answer: not an example
    correct = int(((misses == 0) & scored).sum())
    return float(loss), int(mask.sum()), correct, int(scored.sum())


def evaluate(model: Any, batches: list[dict[str, Any]], device: Any, autocast: Any, float_dtype: Any = None) -> dict[str, float]:
    """Summed over this worker's batches and then over all workers (a collective when distributed)."""
    import torch

    was_training = model.training
    model.eval()
    totals = [0.0, 0.0, 0.0, 0.0]
    with torch.no_grad(), autocast():
        for batch in batches:
            batch = to_device(batch, device, float_dtype)
            labels = batch.pop("labels")
            logits = model(**batch).logits
            totals = [a + b for a, b in zip(totals, answer_stats(logits, labels), strict=True)]
    loss, tokens, correct, count = reduce(totals, device)  # every rank, with or without rows
    model.train(was_training)
    return {"eval_loss": loss / max(tokens, 1), "eval_accuracy": correct / max(count, 1), "eval_examples": int(count)}
