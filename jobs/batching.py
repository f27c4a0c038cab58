"""The batch schedule: which rows every worker trains on at every optimizer step, for the whole run.

It is computed once, before any worker starts, from the row index (row ids and token lengths, image
tokens included), so it is a pure function of the data, the job and the number of workers:
- a seed fixes it: the same job gives the same batches;
- each epoch is one seeded permutation of the rows, every row in it once (rows that fill no whole
  optimizer step at the epoch's end are left out of that epoch, as before);
- a global micro batch is cut into one slice per worker, so N workers x micro batch m see exactly the
  rows one worker with micro batch N x m sees;
- a resumed run starts at step k of the same schedule: exactly the rows the uninterrupted run saw next.

Batching (`data.batching`):
- rows: micro_batch_size rows per worker, in permutation order (padding to the longest row of each);
- length_grouped: the permutation is cut into mega batches of 50 global micro batches, each sorted by
  length and cut again (HF Trainer's `group_by_length` recipe); the micro batches are then shuffled;
- tokens: each worker's micro batch holds as many rows as fit `data.batch_tokens` padded tokens
  (rows x longest row), filled from length-sorted mega batches; the micro batches are then shuffled;
- packed: each worker's micro batch is rows whose lengths sum to at most `data.batch_tokens` (one packed
  sequence, jobs/data.collate with packed_from), filled first-fit longest first within each mega batch; the
  micro batches are then shuffled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from orchestrator.config import DataConfig, TrainConfig

MEGA = 50  # global micro batches per length-sorted mega batch (HF Trainer's LengthGroupedSampler uses 50)


@dataclass
class Schedule:
    steps: list[list[list[np.ndarray]]]
    """steps[s][k][r]: row ids of worker r's k-th micro batch of optimizer step s."""
    epoch_starts: list[int] = field(default_factory=list)
    """The step at which each epoch begins."""

    @property
    def total_steps(self) -> int:
        return len(self.steps)



def epoch_of(done: int, epoch_starts: list[int], total_steps: int) -> float:
    """Fractional epochs completed after `done` optimizer steps (epochs may differ in steps under tokens)."""
    bounds = [*epoch_starts, total_steps]
    e = max(0, int(np.searchsorted(epoch_starts, done, side="right")) - 1)
    if e + 1 < len(bounds) and done >= bounds[e + 1]:
        return float(e + 1)
    return e + (done - bounds[e]) / max(1, bounds[e + 1] - bounds[e])


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(seed * 1000 + epoch)


def global_micro_batches(order: np.ndarray, lengths: np.ndarray, data: DataConfig, micro: int, world: int, rng: np.random.Generator | None) -> list[list[np.ndarray]]:
    """Cut positions `order` (into `lengths`) into global micro batches, each a list of one array per worker.
    rng None: keep the order of the batches (eval); else shuffle them (length_grouped and tokens)."""
    g = micro * world
    if data.batching == "rows":
        return [[order[m * g + r * micro : m * g + (r + 1) * micro] for r in range(world)] for m in range(len(order) // g)]
    # length_grouped and tokens: sort mega batches by length, longest first, then cut
    mega = MEGA * g
    if data.batching == "packed":  # a packed micro batch holds batch_tokens / mean length rows, not micro_batch_size
        mega = MEGA * world * max(micro, int(data.batch_tokens or 0) // max(1, int(lengths.mean())))
    pieces: list[np.ndarray] = []
    for start in range(0, len(order), mega):
        chunk = order[start : start + mega]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        if data.batching == "length_grouped":
            pieces.extend(chunk[m * micro : (m + 1) * micro] for m in range(len(chunk) // micro))
        elif data.batching == "packed":
            pieces.extend(_pack_to_budget(chunk, lengths, data))
        else:
            pieces.extend(_fill_to_budget(chunk, lengths, data))
    if data.batching == "length_grouped":
        # keep each global micro batch's slices adjacent (similar lengths on every worker), shuffle the groups
        groups = [pieces[m * world : (m + 1) * world] for m in range(len(pieces) // world)]
        if rng is not None:
            groups = [groups[i] for i in rng.permutation(len(groups))]
        return groups
    if rng is not None:
        pieces = [pieces[i] for i in rng.permutation(len(pieces))]
    return [pieces[m * world : (m + 1) * world] for m in range(len(pieces) // world)]


def build_schedule(rows: np.ndarray, lengths: np.ndarray, train: TrainConfig, data: DataConfig, world: int) -> Schedule:
    """The whole run's schedule over the kept rows `rows` (row ids) with their token `lengths`."""
    n = len(rows)
    schedule = Schedule(steps=[])
    epoch = 0
    while True:
        if train.max_steps is None and epoch >= train.epochs:
            break
        if train.max_steps is not None and schedule.total_steps >= train.max_steps:
            break
        order = _rng(train.seed, epoch).permutation(n)
        batches = global_micro_batches(order, lengths, data, train.micro_batch_size, world, _rng(train.seed + 7919, epoch))
        per_epoch = len(batches) // train.grad_accum
        if per_epoch == 0:
            raise ValueError(
                f"{n} rows cannot fill one optimizer step ({train.micro_batch_size} rows x {world} workers x grad_accum {train.grad_accum}"
                + (f", batch_tokens {data.batch_tokens}" if data.batching in ("tokens", "packed") else "")
                + "); use more rows, or lower train.micro_batch_size / train.grad_accum"
            )
        schedule.epoch_starts.append(schedule.total_steps)
        for s in range(per_epoch):
            step = batches[s * train.grad_accum : (s + 1) * train.grad_accum]
            schedule.steps.append([[rows[part] for part in gm] for gm in step])
        epoch += 1
    if train.max_steps is not None:
        del schedule.steps[train.max_steps :]
    return schedule


def eval_batches(rows: np.ndarray, lengths: np.ndarray, data: DataConfig, micro: int, rank: int, world: int) -> list[np.ndarray]:
    """Worker `rank`'s eval micro batches: every world-th row from `rank`, in micro batches of `micro`
    rows (tokens: up to batch_tokens padded tokens; packed: up to batch_tokens tokens), sorted by length unless
    batching is rows."""
    mine = np.arange(rank, len(rows), world)
    if data.batching != "rows":
        mine = mine[np.argsort(-lengths[mine], kind="stable")]
    if data.batching == "tokens":
        return [rows[part] for part in _fill_to_budget(mine, lengths, data)]
    if data.batching == "packed":
        return [rows[part] for part in _pack_to_budget(mine, lengths, data)]
    return [rows[mine[i : i + micro]] for i in range(0, len(mine), micro)]


def _fill_to_budget(sorted_positions: np.ndarray, lengths: np.ndarray, data: DataConfig) -> list[np.ndarray]:
    """Cut positions sorted longest first into micro batches of at most data.batch_tokens padded tokens
    (the first row of each sets its padded width); a row longer than the budget goes alone."""
    assert data.batch_tokens is not None
    out, i = [], 0
    while i < len(sorted_positions):
        n = max(1, data.batch_tokens // int(lengths[sorted_positions[i]]))
        out.append(sorted_positions[i : i + n])
        i += n
    return out


def _pack_to_budget(sorted_positions: np.ndarray, lengths: np.ndarray, data: DataConfig) -> list[np.ndarray]:
    """Pack positions sorted longest first into micro batches whose lengths sum to at most data.batch_tokens:
    first fit (each row into the first micro batch with room, else a new one), which leaves little room unused
    when short rows follow long ones. The rows keep their sorted order within a micro batch."""
    assert data.batch_tokens is not None
    if len(sorted_positions) == 0:
        return []
    shortest = int(lengths[sorted_positions[-1]])
    bins: list[list[int]] = []
    room: list[int] = []
    open_bins: list[int] = []  # the bins that still have room for the shortest row
    for p in sorted_positions:
        n = int(lengths[p])
        k = next((j for j in open_bins if room[j] >= n), None)
        if k is None:
            k = len(bins)
            bins.append([])
            room.append(data.batch_tokens)
            open_bins.append(k)
        bins[k].append(int(p))
        room[k] -= n
        if room[k] < shortest:
            open_bins.remove(k)
    return [np.asarray(b, dtype=sorted_positions.dtype) for b in bins]


def padding_fraction(batches: list[np.ndarray], length_of: dict[int, int] | np.ndarray) -> float:
    """Share of padded token slots (rows x longest row, summed over micro batches) that hold padding."""
    slots = useful = 0
    for b in batches:
        ls = [int(length_of[int(i)]) for i in b]
        slots += len(ls) * max(ls)
        useful += sum(ls)
    return 1 - useful / max(1, slots)
