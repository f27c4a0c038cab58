"""Encode once (data.encode_once: auto): a Ray Data pass writes every row's encoded tensors beside its row
store, and the workers' streams then read them back instead of running the processor again, for every
epoch, resume and search trial.

Why: on a machine whose cores both train and encode, encoding in the stream takes CPU from every step
(bench/data_scale.py: 0.80x the steps/s of the in-memory path on 2 cores); encoded once, the stream only
reads and collates. The encoded rows are as large as the processor's output (a 384x384 SigLIP image is
1.7 MiB of fp32 pixels), so the pass runs only when they fit a quarter of this machine's memory (read back
from the page cache; 10k such rows, 17 GB, read from this machine's disk gave 10 samples/s against 41 for
encoding as they stream) and half the free disk where the row store is; otherwise the run says so and Ray
Data encodes rows as they stream. The cache is keyed by what the encoding
depends on (the processor's files, the columns, data.blind): a search trial that changes the model gets
its own stream, encoded as it goes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from jobs import rowstore
from jobs.data import encode_row_payload
from jobs.stream import (
    PAYLOAD,
    Index,
    in_process,
    index_key,
    job_from_json,
    one_thread,
    processor_for,
    quiet_data_context,
)
from orchestrator import architectures
from orchestrator.config import JobConfig


def _root(job: JobConfig, store: rowstore.Store) -> Path:
    key = hashlib.sha256(json.dumps([index_key(job, store), job.data.blind]).encode()).hexdigest()[:16]
    return Path(store.root) / f"encoded-{key}"


def encode_chunk(job: JobConfig, processor: Any, store: rowstore.Store, c: int, out: Path, with_image: bool) -> int:
    """Chunk c of the row store, encoded, written as chunk c of the encoded store 32 rows at a time (a
    chunk of 384x384 images is ~435 MB encoded: it is never held whole); the bytes written."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    data_file = Path(store.data_file)
    rows = store.chunk(c)
    schema = pa.schema([(PAYLOAD, pa.binary())])
    written = 0
    with pa.OSFile(str(out / f"chunk-{c:06d}.arrow"), "wb") as sink, ipc.new_file(sink, schema) as writer:
        for start in range(0, rows.num_rows, 32):
            part = rows.slice(start, 32).to_pylist()
            payloads = [encode_row_payload(row, c * rowstore.CHUNK + start + j, job.data, processor, with_image, data_file) for j, row in enumerate(part)]
            writer.write_batch(pa.record_batch([pa.array(payloads, pa.binary())], schema=schema))
            written += sum(len(p) for p in payloads)
    return written


def _encode_chunk(batch: Any, job_json: str, store: rowstore.Store, out: str, with_image: bool) -> Any:
    """encode_chunk as a Ray Data task."""
    import pyarrow as pa

    one_thread()
    job = job_from_json(job_json)
    c = int(batch.column("chunk")[0].as_py())
    return pa.table({"chunk": [c], "bytes": [encode_chunk(job, processor_for(job.model_dir), store, c, Path(out), with_image)]})


def _memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def attach(job: JobConfig, indexes: dict[str, Index]) -> dict[str, Index]:
    """The indexes with their encoded rows, where a pass has written them for this job's encoding."""
    out = {}
    for which, ix in indexes.items():
        root = _root(job, ix.store)
        found = rowstore.Store(str(root), ix.store.data_file, ix.store.n_rows, (PAYLOAD,)) if (root / rowstore.META).is_file() else None
        out[which] = dataclasses.replace(ix, encoded=found if job.data.encode_once == "auto" else None)
    return out


def encode_once(job: JobConfig, indexes: dict[str, Index]) -> tuple[dict[str, Index], dict[str, str]]:
    """Encode every row of every data file once (Ray Data tasks, spread over the nodes), unless
    data.encode_once is off or the result would not fit the disk budget. Returns the indexes with their
    encoded rows attached, and per file what happened (for the run's output). A small file (jobs/stream.py:
    in_process) is encoded in this process; a larger one by Ray Data tasks (Ray must be up)."""
    if job.data.encode_once == "off":
        return indexes, {which: "encoded as rows stream (data.encode_once: off)" for which in indexes}
    with_image = architectures.for_model_dir(job.model_dir).kind == "vlm"
    said = {}
    for which, ix in indexes.items():
        root = _root(job, ix.store)
        if (root / rowstore.META).is_file():
            said[which] = f"encoded rows reused ({root})"
            continue
        processor = processor_for(job.model_dir)
        sample = ix.store.take([int(ix.rows[0])])[0]
        per_row = len(encode_row_payload(sample, int(ix.rows[0]), job.data, processor, with_image, Path(ix.store.data_file)))
        need, budget = per_row * ix.store.n_rows, min(shutil.disk_usage(ix.store.root).free // 2, _memory_bytes() // 4)
        if need > budget:
            said[which] = (f"encoded as rows stream: encoded once they would take {need / 2**30:.1f} GiB, over "
                           f"{budget / 2**30:.1f} GiB (a quarter of the memory, half the free disk)")
            continue
        tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=ix.store.root))
        try:
            if in_process(ix.store):  # a small file: here, as its validation pass ran (jobs/stream.py)
                written = sum(encode_chunk(job, processor, ix.store, c, tmp, with_image) for c in range(ix.store.n_chunks))
            else:
                import ray.data

                quiet_data_context()
                ds = ray.data.from_items([{"chunk": c} for c in range(ix.store.n_chunks)], override_num_blocks=ix.store.n_chunks)
                ds = ds.map_batches(_encode_chunk, batch_size=1, batch_format="pyarrow", scheduling_strategy="SPREAD",
                                    fn_kwargs={"job_json": job.model_dump_json(), "store": ix.store, "out": str(tmp), "with_image": with_image})
                written = sum(int(b) for t in ds.iter_batches(batch_size=None, batch_format="pyarrow") for b in t.column("bytes").to_pylist())
            (tmp / rowstore.META).write_text(json.dumps({"n_rows": ix.store.n_rows, "bytes": written}))
            tmp.chmod(0o755)
            try:
                os.rename(tmp, root)
            except OSError:  # another search encoded the same rows meanwhile: theirs is as good
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        said[which] = f"{ix.store.n_rows} rows encoded once ({written / 2**20:.0f} MiB beside the row store)"
    return attach(job, indexes), said
