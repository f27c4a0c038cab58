"""Packed micro batches (data.batching: packed) on the worker: which row each token belongs to, and Qwen2-VL's 3-D
positions made per row.

A packed micro batch (jobs/data.collate_packed) is one sequence of rows end to end, with position_ids restarting
at each row and no attention_mask. transformers reads the restarts: its masking_utils builds a block-diagonal
causal mask (sdpa, eager) and FlashAttention 2 runs the rows as variable-length sequences, so no token attends
across rows. Qwen2-VL and Qwen2.5-VL (M-RoPE) take 4 rows of positions: the text positions, which the mask is
built from, then the temporal, height and width positions of each row's tokens, which the model's own
get_rope_index computes here for each row as it would for that row unpacked.
"""

from __future__ import annotations

from typing import Any


def is_packed(batch: dict[str, Any]) -> bool:
    """Whether a collated micro batch is packed (only collate_packed sets position_ids)."""
    return "position_ids" in batch


def row_ids(position_ids: Any) -> Any:
    """The row (0, 1, ...) of each token of a packed sequence, [1, tokens]: a new row starts wherever the position
    does not follow the previous one (transformers' masking_utils.find_packed_sequence_indices reads the same)."""
    import torch

    starts = torch.diff(position_ids, dim=-1) != 1
    return torch.cat([torch.zeros_like(position_ids[:, :1]), starts.long().cumsum(-1)], dim=-1)


def _hf_model(model: Any) -> Any:
    """The transformers model under DDP's or DeepSpeed's wrapper (.module) and peft's (get_base_model)."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def model_inputs(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The packed batch as the model takes it: for an M-RoPE model (its inner model has get_rope_index), position_ids
    become [4, 1, tokens]: the text positions, then get_rope_index's 3-D positions computed row by row (the rows
    padded into a batch with an attention_mask, as collate would give them unpacked). Other models: unchanged."""
    import torch

    get_rope_index = getattr(getattr(_hf_model(model), "model", None), "get_rope_index", None)
    if get_rope_index is None:
        return batch
    positions = batch["position_ids"]
    if "mm_token_type_ids" not in batch:  # no row has an image: text positions in every dimension
        return {**batch, "position_ids": positions[None].expand(4, -1, -1)}
    rows = row_ids(positions)[0]
    n = int(rows[-1]) + 1
    lengths = torch.bincount(rows, minlength=n)
    width = int(lengths.max())
    column = positions[0] - positions[0, torch.cumsum(lengths, 0)[rows] - lengths[rows]]  # 0.. within each row
    mask = torch.zeros((n, width), dtype=torch.long, device=positions.device)
    mask[rows, column] = 1
    padded = {}
    for key in ("input_ids", "mm_token_type_ids"):
        padded[key] = torch.zeros((n, width), dtype=batch[key].dtype, device=positions.device)
        padded[key][rows, column] = batch[key][0]
    grid = {k: batch[k] for k in ("image_grid_thw", "video_grid_thw") if k in batch}
    mrope, _ = get_rope_index(padded["input_ids"], mm_token_type_ids=padded["mm_token_type_ids"], attention_mask=mask, **grid)
    return {**batch, "position_ids": torch.cat([positions[None], mrope[:, rows, column][:, None]])}
