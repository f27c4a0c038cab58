"""Rows through Ray Data: the validation pass over every row, and each worker's stream of encoded micro batches.

    controller: data file --rowstore.build--> row store (Arrow chunks; schema, row count)
    driver:     Ray Data pass over the chunks: check every row, measure its tokens  -> Index (ids, lengths)
                Index --batching.build_schedule--> which rows each worker trains on at each step
                one Dataset per worker: its micro batches in step order --map_batches(encode)-->
    worker:     ray.train.get_dataset_shard("train_<rank>").iter_batches(prefetch) -> collated tensors
    (no Ray:    jobs/local_worker.py reads the same schedule_items through encode_item in its own process)

Decoding and the processor run in Ray Data tasks, on any node with CPUs, never on the training thread; a
worker holds a bounded window of micro batches whatever the data's size. Rows carry their ids from the
store, so the schedule is exact: each row once per epoch, the same rows on a resumed run.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from jobs import batching, rowstore
from jobs.data import (
    DataError,
    check_row,
    collate,
    columns,
    decode_payload,
    encode_row,
    filler_row,
    has_image,
    image_tokens,
    measure,
    optional_columns,
    pad_token_id,
    too_long_message,
)
from jobs.rowstore import problem
from orchestrator import architectures
from orchestrator.config import JobConfig

PAYLOAD = "payload"  # the column of an encoded row store (jobs/encoded.py)
PREFETCH = 2  # micro batches each worker holds ready beyond the one it trains on
# Schedule items (micro batches) per Ray Data block, so per task. Ray Data costs ~25-50 ms per block here: one
# item per block capped a stream at ~20-40 micro batches/s and took that CPU from training (10k rows of
# bench/data_scale.py ran at 12 samples/s against 45 at 1k); 20 per block ran 625 items/s.
ITEMS_PER_BLOCK = 8
# Data files of at most this many rows are checked and encoded once in the driver's process, not by Ray Data
# tasks: a task process starts, imports torch and transformers and loads the processor (seconds each, and the
# 2-core machine here ran several at once), while 1,000 64x64-image rows check in ~1 s in one process.
LOCAL_ROWS = 2048
INDEX_VERSION = 3  # 2: chat layouts, several images per row, multi-turn; 3: image tokens per row, pixel budgets


@dataclass(frozen=True)
class Index:
    """One data file's usable rows: ids in the store and token lengths (image tokens included)."""

    store: rowstore.Store
    option: str
    rows: np.ndarray
    lengths: np.ndarray
    dropped: int
    cached: bool
    """The validation pass had run before (for this data and processor) and was read back."""
    nodes: int
    """Ray nodes whose CPUs ran the validation pass (0: the driver's process ran it, or it was read from the cache)."""
    encoded: rowstore.Store | None = None
    """Every row's encoded tensors, written once for a search (jobs/encoded.py); None: encode as it streams."""
    image_tokens: np.ndarray | None = None
    """Tokens each row's images take (0 for a text-only row), beside `rows`; None for a text model."""


def build_stores(job: JobConfig, cache_root: Path, only: str | None = None) -> dict[str, rowstore.Store]:
    """The controller's part (no Ray): each data file's row store, checking what needs no decoding."""
    needs_image = architectures.for_model_dir(job.model_dir).kind == "vlm"
    cols, optional = columns(job.data, needs_image), optional_columns(job.data, needs_image)
    stores, problems = {}, []
    for which, path in (("train", job.data.train), ("eval", job.data.eval)):
        if path and only in (None, which):
            try:
                stores[which] = rowstore.build(path, cols, cache_root, f"data.{which}", optional)
            except DataError as e:
                problems.extend(e.problems)
    if problems:
        raise DataError(problems)
    return stores


@lru_cache(maxsize=4)
def job_from_json(job_json: str) -> JobConfig:
    return JobConfig.model_validate(json.loads(job_json))


def processor_for(model: str) -> Any:
    """The model's processor, loaded once per process (Ray reuses its task processes across tasks; the driver
    loads it once for the preflight and the in-process passes), and again when its files change."""
    folder = Path(model)
    files = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in folder.glob("*.json"))) if folder.is_dir() else ()
    return _load_processor(model, files)


@lru_cache(maxsize=2)
def _load_processor(model: str, files: tuple[tuple[str, int], ...]) -> Any:
    from jobs.model import load_processor

    return load_processor(model, architectures.for_model_dir(model))


def one_thread() -> None:
    """A Ray Data task reserves one CPU; torch's image maths should use one thread, not every core."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# ---- the validation pass ------------------------------------------------------------------------------

def check_chunk(
    job: JobConfig, processor: Any, store: rowstore.Store, c: int, option: str, with_image: bool
) -> tuple[list[int], list[int], list[list[str]], list[int]]:
    """Chunk c of the store, every row checked and measured: (row ids, lengths: -1 for a bad row, each row's
    problems, the tokens its images take)."""
    max_images = architectures.for_model_dir(job.model_dir).max_images
    data_file = Path(store.data_file)
    ids, lengths, problems, pictures = [], [], [], []
    for j, row in enumerate(store.chunk(c).to_pylist()):
        i = c * rowstore.CHUNK + j
        found, images = check_row(row, job.data, with_image, data_file, max_images)
        said = [problem(f"{data_file} ({option}) row {i}", p.what, p.fix) for p in found]
        length, picture = -1, 0
        if not found:
            try:
                length = measure(row, job.data, processor, with_image, images)
                picture = image_tokens(processor, images)
            except Exception as e:  # the processor or the chat template refused the row
                fix = getattr(e, "fix", "") or "check the row against the model's chat template and processor, or drop it"
                said = [problem(f"{data_file} ({option}) row {i}", getattr(e, "what", f"cannot be encoded ({type(e).__name__}: {e})"), fix)]
        ids.append(i)
        lengths.append(length)
        problems.append(said)
        pictures.append(picture)
    return ids, lengths, problems, pictures


def _scan_chunk(batch: Any, job_json: str, store: rowstore.Store, option: str, with_image: bool) -> Any:
    """check_chunk as a Ray Data task."""
    import pyarrow as pa

    one_thread()
    job = job_from_json(job_json)
    c = int(batch.column("chunk")[0].as_py())
    ids, lengths, problems, pictures = check_chunk(job, processor_for(job.model_dir), store, c, option, with_image)
    node = _node_id()
    return pa.table(
        {"row": pa.array(ids, pa.int64()), "length": pa.array(lengths, pa.int32()), "problem": pa.array(problems, pa.list_(pa.string())),
         "image_tokens": pa.array(pictures, pa.int32()), "node": [node] * len(ids)}
    )


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def index_key(job: JobConfig, store: rowstore.Store) -> str:
    """What a row's length depends on: the processor's files and the columns (not max_length: a search over it reuses)."""
    model = Path(job.model_dir)
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model.glob("*.json")) if model.is_dir() else []
    d = job.data
    text = json.dumps([INDEX_VERSION, str(model.resolve()), files, d.messages, d.prompt, d.answer, d.image, d.images, d.train_on, d.max_pixels, d.min_pixels, store.root])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def in_process(store: rowstore.Store) -> bool:
    """Whether a data file is small enough to check (and encode once) in the driver's own process: up to
    LOCAL_ROWS rows, where starting Ray Data tasks (a process each, importing torch and transformers and
    loading the processor) costs more than the rows themselves."""
    return store.n_rows <= LOCAL_ROWS


def all_in_process(stores: dict[str, rowstore.Store]) -> bool:
    """Every data file of the job is in_process: its checks need no Ray at all."""
    return all(in_process(store) for store in stores.values())


def scan(job: JobConfig, store: rowstore.Store, option: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Every row checked and measured: in this process for a small file (in_process), else by Ray Data
    tasks spread over the cluster's nodes; (row ids, lengths, the tokens each row's images take, nodes that
    ran the pass: 0 when this process did or the index was read back from the cache beside the store).
    Raises DataError listing every bad row."""
    cache = Path(store.root) / f"index-{index_key(job, store)}.npz"
    if cache.is_file():
        saved = np.load(cache)
        return saved["rows"], saved["lengths"], saved["image_tokens"], 0
    with_image = architectures.for_model_dir(job.model_dir).kind == "vlm"
    ids, lengths, pictures, problems, nodes = [], [], [], [], set()
    if in_process(store):
        processor = processor_for(job.model_dir)
        for c in range(store.n_chunks):
            got_ids, got_lengths, got_problems, got_pictures = check_chunk(job, processor, store, c, option, with_image)
            ids.append(np.asarray(got_ids, np.int64))
            lengths.append(np.asarray(got_lengths, np.int32))
            pictures.append(np.asarray(got_pictures, np.int32))
            problems.extend(q for p in got_problems for q in p)
    else:
        import ray.data

        quiet_data_context()
        ds = ray.data.from_items([{"chunk": c} for c in range(store.n_chunks)], override_num_blocks=store.n_chunks)
        ds = ds.map_batches(
            _scan_chunk, batch_size=1, batch_format="pyarrow", scheduling_strategy="SPREAD",
            fn_kwargs={"job_json": job.model_dump_json(), "store": store, "option": option, "with_image": with_image},
        )
        for b in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            ids.append(b.column("row").to_numpy())
            lengths.append(b.column("length").to_numpy())
            pictures.append(b.column("image_tokens").to_numpy())
            problems.extend(q for p in b.column("problem").to_pylist() for q in p)
            nodes.update(b.column("node").to_pylist())
    rows, lens = np.concatenate(ids), np.concatenate(lengths)
    if problems:  # with the rows too long among the others, so that every problem is named at once
        if job.data.too_long == "error":
            long = lens > job.data.max_length
            problems += [too_long_message(f"{store.data_file} ({option})", int(i), int(n), job.data) for i, n in zip(rows[long], lens[long], strict=True)]
        raise DataError(sorted(problems, key=_row_number))
    order = np.argsort(rows)
    rows, lens, images = rows[order], lens[order], np.concatenate(pictures)[order]
    tmp = cache.with_suffix(f".{os.getpid()}.npz")
    np.savez(tmp, rows=rows, lengths=lens, image_tokens=images)
    tmp.rename(cache)
    return rows, lens, images, len(nodes)


def _row_number(problem: str) -> tuple[str, int]:
    head, _, rest = problem.partition(" row ")
    return head, int(rest.split(":")[0]) if rest.split(":")[0].isdigit() else 0


def index(job: JobConfig, stores: dict[str, rowstore.Store]) -> dict[str, Index]:
    """The validation pass over every data file, then data.max_length applied (error naming each row, or drop)."""
    out, problems = {}, []
    vlm = architectures.for_model_dir(job.model_dir).kind == "vlm"
    for which, store in stores.items():
        option = f"data.{which}"
        try:
            rows, lengths, images, nodes = scan(job, store, option)
        except DataError as e:
            problems.extend(e.problems)
            continue
        long = lengths > job.data.max_length
        if long.any() and job.data.too_long == "error":
            problems.extend(too_long_message(f"{store.data_file} ({option})", int(i), int(n), job.data) for i, n in zip(rows[long], lengths[long], strict=True))
            continue
        out[which] = Index(store, option, rows[~long], lengths[~long], int(long.sum()), cached=nodes == 0, nodes=nodes,
                           image_tokens=images[~long] if vlm else None)
    if problems:
        raise DataError(problems)
    return out


# ---- the training stream ------------------------------------------------------------------------------


def quiet_data_context() -> None:
    """Ray Data settings for rayft's datasets: outputs in input order (the schedule is the order), no
    progress bars in ray.log."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False


def _encode_items(
    batch: Any, job_json: str, store: rowstore.Store, option: str, with_image: bool, encoded: rowstore.Store | None, pad_id: int, filler: bytes | None = None,
    packed_from: int | None = None,
) -> Any:
    """encode_item as a Ray Data task: on one thread, naming the Ray node that ran it."""
    one_thread()
    return encode_item(batch, job_json, store, option, with_image, encoded, pad_id, filler, _node_id(), packed_from)


def encode_item(
    batch: Any, job_json: str, store: rowstore.Store, option: str, with_image: bool, encoded: rowstore.Store | None, pad_id: int, filler: bytes | None,
    node: str, packed_from: int | None = None,
) -> Any:
    """One schedule item (a worker's micro batch: row ids) -> the collated micro batch, pickled. A row that
    fails here is sent on as the item's `problem` (not raised: Ray Data's task error would bury it), and
    the worker fails the run naming it. Rows encoded once are only read and collated: the task loads no
    processor (a task process would otherwise spend seconds importing transformers and loading it).
    filler (DeepSpeed: deepspeed_filler): a pickled jobs.data.filler_row, added to a VLM micro batch without an
    image, and alone to an empty one (ZeRO-3's eval batches that even out the ranks). node: who encoded it (a
    Ray node; jobs/local_worker.py, which runs without Ray, names its process). packed_from (data.batching: packed, from
    encode_kwargs): the architecture's first position id, for jobs/data.collate."""
    import pyarrow as pa

    job = job_from_json(job_json)
    processor = processor_for(job.model_dir) if encoded is None else None
    ids = batch.column("rows")[0].as_py()
    data_file = Path(store.data_file)
    examples, problem, payload = [], "", b""
    sources = encoded.take(ids) if encoded is not None else store.take(ids)
    for i, row in zip(ids, sources, strict=True):
        try:
            e = decode_payload(row[PAYLOAD], i) if encoded is not None else encode_row(row, i, job.data, processor, with_image, data_file)
        except Exception as err:  # the row changed since the validation pass
            problem = f"{data_file} ({option}) row {i}: {type(err).__name__}: {err} (it passed validation before training: did the file change?)"
            break
        if len(e.input_ids) > job.data.max_length:
            problem = too_long_message(f"{data_file} ({option})", i, len(e.input_ids), job.data)
            break
        examples.append(e)
    if not problem:
        if filler is not None and not any(has_image(e) for e in examples) and (with_image or not examples):
            examples.append(pickle.loads(filler))
        tensors = {k: v.numpy() for k, v in collate(examples, pad_id, packed_from).items()}
        payload = pickle.dumps({"rows": ids, "tensors": tensors, "node": node}, protocol=5)
    return pa.table({"step": batch.column("step"), "micro": batch.column("micro"), "batch": pa.array([payload], pa.binary()), "problem": [problem]})


def encode_kwargs(job: JobConfig, index: Index, filler: bytes | None) -> dict[str, Any]:
    """_encode_items' arguments for the items of one data file (Ray Data's tasks, or jobs/local_worker.py)."""
    arch = architectures.for_model_dir(job.model_dir)
    return {"job_json": job.model_dump_json(), "store": index.store, "option": index.option, "with_image": arch.kind == "vlm", "encoded": index.encoded,
            "pad_id": pad_token_id(processor_for(job.model_dir)), "filler": filler,
            "packed_from": arch.first_position if job.data.batching == "packed" else None}


def _dataset(items: list[dict[str, Any]], job: JobConfig, index: Index, filler: bytes | None) -> Any:
    import ray.data

    ds = ray.data.from_items(items, override_num_blocks=max(1, -(-len(items) // ITEMS_PER_BLOCK)))
    return ds.map_batches(
        _encode_items, batch_size=1, batch_format="pyarrow", scheduling_strategy="SPREAD",  # encode on every node with CPUs
        fn_kwargs=encode_kwargs(job, index, filler),
    )


@dataclass(frozen=True)
class Items:
    """Each worker's schedule items (micro batches: {step, micro, rows}) from a start step on: no Ray needed."""

    train: dict[int, list[dict[str, Any]]]
    """rank -> its training micro batches, in step order."""
    eval: dict[int, list[dict[str, Any]]]
    """rank -> its eval micro batches (a rank without eval rows is absent)."""
    filler: bytes | None
    """deepspeed_filler's row, added by the encoder where a micro batch needs it."""
    total_steps: int
    epoch_starts: list[int]
    rows: int
    dropped_rows: int
    eval_rows: int


@dataclass(frozen=True)
class Plan:
    datasets: dict[str, Any]
    """train_<rank> and eval_<rank>: each worker reads only its own (none when `direct`)."""
    names: list[str]
    """The shards' names (train_<rank>, eval_<rank>), whichever way they are fed."""
    direct: dict[str, Any] | None
    """Rows encoded once, read by the workers themselves (direct_shards): {"items": name -> schedule items,
    "encode": "train"/"eval" -> encode_item's arguments}; None: Ray Data's datasets feed them."""
    total_steps: int
    epoch_starts: list[int]
    rows: int
    dropped_rows: int
    eval_rows: int


def deepspeed_filler(job: JobConfig) -> bytes | None:
    """The pickled filler row (jobs/data.filler_row) a DeepSpeed run's micro batches may need; None otherwise.
    Every stage needs it for a VLM: ZeRO-3 gathers the parameters of the modules that run, and ZeRO-1/2
    reduce gradients in buckets as they are produced, so a rank whose micro batch skipped the vision tower
    reduces other buckets than its peers (gloo aborts, NCCL hangs)."""
    if job.deepspeed is None:
        return None
    with_image = architectures.for_model_dir(job.model_dir).kind == "vlm"
    return pickle.dumps(filler_row(processor_for(job.model_dir), with_image), protocol=5)


def schedule_items(job: JobConfig, indexes: dict[str, Index], world: int, start_step: int) -> Items:
    """Each worker's micro batches from `start_step` on (a resumed run starts mid-schedule: exactly the rows it
    would have seen next)."""
    train = indexes["train"]
    try:
        schedule = batching.build_schedule(train.rows, train.lengths, job.train, job.data, world)
    except ValueError as e:
        raise DataError([problem(f"{train.store.data_file} (data.train)", str(e), "lower train.micro_batch_size or train.grad_accum, or add rows")]) from None
    filler = deepspeed_filler(job)
    eval_split = {}
    if "eval" in indexes:
        ev = indexes["eval"]
        eval_split = {r: batching.eval_batches(ev.rows, ev.lengths, job.data, job.train.micro_batch_size, r, world) for r in range(world)}
        if filler is not None and job.deepspeed.stage == 3:  # every rank runs as many eval forwards: the short ones add filler-only batches
            most = max(len(b) for b in eval_split.values())
            eval_split = {r: b + [np.array([], dtype=np.int64)] * (most - len(b)) for r, b in eval_split.items()}
    train_items = {
        r: [
            {"step": s, "micro": k, "rows": [int(i) for i in micro[r]]}
            for s in range(start_step, schedule.total_steps)
            for k, micro in enumerate(schedule.steps[s])
        ]
        for r in range(world)
    }
    eval_items = {r: [{"step": -1, "micro": k, "rows": [int(i) for i in b]} for k, b in enumerate(eval_split[r])] for r in range(world) if eval_split.get(r)}
    return Items(train_items, eval_items, filler, schedule.total_steps, schedule.epoch_starts, len(train.rows), train.dropped,
                 len(indexes["eval"].rows) if "eval" in indexes else 0)


def direct_ok(indexes: dict[str, Index]) -> bool:
    """Whether workers on the driver's machine can read their micro batches straight from the rows encoded once,
    without Ray Data: every data file small (in_process) and encoded once. Reading and collating such rows takes
    milliseconds, while a Ray Data stream starts task processes that took seconds before the first batch (and
    the cores they ran on from training: bench/overhead.py)."""
    return all(ix.encoded is not None and in_process(ix.store) for ix in indexes.values())


def plan(job: JobConfig, indexes: dict[str, Index], world: int, start_step: int, local: bool = False) -> Plan:
    """Each worker's micro batches from `start_step` on (its schedule_items): encoded by Ray Data tasks as it reads
    them, or (local: every worker runs on the driver's machine, and direct_ok) read by the worker itself from the
    rows encoded once on this machine's disk (direct_shards). A cluster's workers always read through Ray Data:
    they may run on nodes (an autoscaler's, say) that cannot see this disk."""
    its = schedule_items(job, indexes, world, start_step)
    names = [f"train_{r}" for r in range(world)] + [f"eval_{r}" for r in range(world) if r in its.eval]
    counts = (its.total_steps, its.epoch_starts, its.rows, its.dropped_rows, its.eval_rows)
    if local and direct_ok(indexes):
        items = {**{f"train_{r}": its.train[r] for r in range(world)}, **{f"eval_{r}": its.eval[r] for r in its.eval}}
        encode = {which: encode_kwargs(job, ix, its.filler) for which, ix in indexes.items()}
        return Plan({}, sorted(names), {"items": items, "encode": encode}, *counts)
    quiet_data_context()
    datasets = {}
    for r in range(world):
        datasets[f"train_{r}"] = _dataset(its.train[r], job, indexes["train"], its.filler)
        if r in its.eval:
            datasets[f"eval_{r}"] = _dataset(its.eval[r], job, indexes["eval"], its.filler)
    return Plan(datasets, sorted(names), None, *counts)


@dataclass
class LocalShard:
    """A worker's micro batches without Ray Data, read as micro_batches reads a Ray Data shard: iter_batches
    yields one encoded item (a one-row pyarrow table) at a time, encoded (rows encoded once: read and collated)
    by `encode` (encode_item) on a thread up to prefetch_batches ahead of the loop. Fed by direct_shards, and by
    jobs/local_worker.py (no Ray at all)."""

    items: list[dict[str, Any]]
    encode: Any
    """encode_item with every argument but the item bound."""

    def iter_batches(self, prefetch_batches: int = 0, **_: Any) -> Iterator[Any]:
        import queue

        import pyarrow as pa

        tables = (self.encode(pa.table({"step": [it["step"]], "micro": [it["micro"]], "rows": [it["rows"]]})) for it in self.items)
        if prefetch_batches <= 0:
            yield from tables
            return
        ready: queue.Queue = queue.Queue(maxsize=prefetch_batches)
        done = threading.Event()  # the loop stopped reading (the generator was closed): the thread ends too
        end = object()

        def fill() -> None:
            try:
                for t in tables:
                    while not done.is_set():
                        try:
                            ready.put(("ok", t), timeout=0.5)
                            break
                        except queue.Full:
                            continue
                    if done.is_set():
                        return
                ready.put(("ok", end))
            except BaseException as e:  # raised where the batches are read, as Ray Data's errors are
                ready.put(("error", e))

        threading.Thread(target=fill, name="rayft-local-shard", daemon=True).start()
        try:
            while True:
                kind, got = ready.get()
                if kind == "error":
                    raise got
                if got is end:
                    return
                yield got
        finally:
            done.set()


def direct_shards(direct: dict[str, Any], rank: int, node: str) -> tuple[LocalShard, LocalShard | None]:
    """Rank `rank`'s (train, eval or None) shards of a plan's `direct` data; node: named as the encoder of each micro batch."""
    from functools import partial

    def shard(name: str, which: str) -> LocalShard | None:
        items = direct["items"].get(name)
        return None if items is None else LocalShard(items, partial(encode_item, **direct["encode"][which], node=node))

    train = shard(f"train_{rank}", "train")
    assert train is not None
    return train, shard(f"eval_{rank}", "eval")


def started(items: Iterator[Any]) -> Iterator[Any]:
    """`items`, its first element being fetched on a thread from this call on: a worker's stream starts (Ray
    Data launches its tasks, which read and collate the first micro batches) while the worker builds its
    model, instead of after it. An error of the stream is raised where the items are consumed, as before."""
    first: dict[str, Any] = {}

    def fetch() -> None:
        try:
            first["item"] = next(items)
        except BaseException as e:  # StopIteration (nothing left to train) or the stream's own error
            first["error"] = e

    thread = threading.Thread(target=fetch, name="rayft-stream-start", daemon=True)
    thread.start()

    def rest() -> Iterator[Any]:
        thread.join()
        if "error" in first:
            if isinstance(first["error"], StopIteration):
                return
            raise first["error"]
        yield first["item"]
        yield from items

    return rest()


def micro_batches(iterator: Any, nodes: set[str] | None = None) -> Any:
    """(step, micro, row ids, tensors) from a worker's dataset iterator, prefetched; `nodes` collects the
    Ray nodes that encoded them."""
    import torch

    for t in iterator.iter_batches(batch_size=1, batch_format="pyarrow", prefetch_batches=PREFETCH):
        problem = t.column("problem")[0].as_py()
        if problem:
            raise DataError([problem])
        payload = pickle.loads(t.column("batch")[0].as_py())
        tensors = {k: torch.from_numpy(v) for k, v in payload["tensors"].items()}
        if nodes is not None:
            nodes.add(payload["node"])
        yield int(t.column("step")[0].as_py()), int(t.column("micro")[0].as_py()), payload["rows"], tensors


def image_token_summary(ix: Index) -> str | None:
    """What the rows' images take, for the run's output: min / median / max image tokens a row (None: a text model)."""
    if ix.image_tokens is None or not len(ix.image_tokens):
        return None
    t = ix.image_tokens
    return f"image tokens per row: min {int(t.min())}, median {int(np.median(t))}, max {int(t.max())}"
