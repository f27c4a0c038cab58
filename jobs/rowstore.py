"""A data file's rows, addressable by row id: Arrow IPC chunks of CHUNK rows, memory-mapped.

Parquet files are usually one large row group (pyarrow's default is 1M rows) and JSONL has no index, so
neither can hand a Ray Data task "rows 17, 40312 and 9" without reading everything before them. The
controller therefore copies the columns a job uses, once, into uncompressed Arrow IPC chunks (the format
Hugging Face datasets caches to), streaming the source a chunk at a time: no image is decoded and memory
stays at one chunk. Any task can then read any row through a memory map, paying only for the pages it
touches. The copy is keyed by the file's path, size and modification time and the columns, and reused by
every run, resume and search trial that reads the same file.

Needs only pyarrow: the controller builds the store before Ray starts and checks what it can see
there: the file parses, the columns exist, and it has rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

CHUNK = 256  # rows per chunk: one validation task each
META = "meta.json"


def problem(where: str, what: str, fix: str = "") -> str:
    """One data problem as the user sees it: where (file, option, row), what is wrong, and the fix."""
    return f"{where}: {what}" + (f"\n    fix: {fix}" if fix else "")


class DataError(ValueError):
    """Every bad row found, each naming its file, option and row, what is wrong and the fix (see problem())."""

    MAX_LISTED = 20

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[: self.MAX_LISTED]
        more = f"\n... and {len(problems) - self.MAX_LISTED} more" if len(problems) > self.MAX_LISTED else ""
        super().__init__("\n".join(shown) + more)


@dataclass(frozen=True)
class Store:
    root: str
    data_file: str
    """The source file (image paths resolve against its directory)."""
    n_rows: int
    columns: tuple[str, ...]

    def chunk_path(self, c: int) -> str:
        return os.path.join(self.root, f"chunk-{c:06d}.arrow")

    @property
    def n_chunks(self) -> int:
        return -(-self.n_rows // CHUNK)

    def chunk(self, c: int) -> pa.Table:
        """Chunk c, memory-mapped: pages load as rows are read and are unmapped with the table (not cached:
        an encoded chunk is hundreds of MB, and mapped pages count in the process's memory)."""
        import pyarrow.ipc as ipc

        return ipc.open_file(pa.memory_map(self.chunk_path(c))).read_all()

    def take(self, row_ids: Any) -> list[dict[str, Any]]:
        """The rows with these ids, in this order, as Python dicts."""
        out: list[dict[str, Any]] = [{}] * len(row_ids)
        by_chunk: dict[int, list[tuple[int, int]]] = {}
        for k, i in enumerate(row_ids):
            c, j = divmod(int(i), CHUNK)
            by_chunk.setdefault(c, []).append((k, j))
        for c, wanted in by_chunk.items():
            rows = self.chunk(c).take([j for _, j in wanted]).to_pylist()
            for (k, _), row in zip(wanted, rows, strict=True):
                out[k] = row
        return out


def _source_batches(path: Path, columns: list[str]):
    """The source's record batches (streamed) and its column names."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        # streamed column chunks: with pyarrow's defaults, copying a 1.5 GB file of 50k image rows peaked at 1.7 GB
        # (233 MB streamed)
        pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=8 << 20)
        names = pf.schema_arrow.names
        have = [c for c in columns if c in names]
        return names, (pf.iter_batches(batch_size=CHUNK, columns=have, use_threads=False) if have else iter(()))
    if path.suffix == ".jsonl":
        import pyarrow.json as pj

        reader = pj.open_json(path)
        names = reader.schema.names
        return names, (b.select([c for c in columns if c in names]) for b in reader)
    raise DataError([problem(str(path), "unsupported file type", "use a .parquet or .jsonl file")])


def _key(path: Path, columns: list[str]) -> str:
    st = path.stat()
    text = json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, columns])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build(
    data_file: str | Path,
    wanted: dict[str, str],
    cache_root: str | Path,
    option: str,
    optional: tuple[str, ...] = (),
) -> Store:
    """The store of data_file's `wanted` columns (column -> the option naming it, for messages), and of the
    `optional` ones the file has, under cache_root (built now, or found from an earlier run). option: the
    job key naming the file (data.train / data.eval), for messages.
    Raises DataError: unreadable file, missing column, no rows. (Image paths are checked by the validation
    pass, with every other row problem, so that all are reported at once.)"""
    path = Path(data_file)
    requested = [*wanted, *(c for c in optional if c not in wanted)]
    root = Path(cache_root) / f"rows-{path.stem}-{_key(path, requested)}"
    if (root / META).is_file():
        meta = json.loads((root / META).read_text())
        return Store(str(root), str(path), meta["n_rows"], tuple(meta["columns"]))
    if path.stat().st_size == 0:
        raise DataError([problem(f"{path} ({option})", "empty file (no rows)", f"point {option} at a file with rows")])
    try:
        names, batches = _source_batches(path, requested)
    except DataError:
        raise
    except Exception as e:  # pyarrow's parse errors name the problem; add the file
        raise DataError([problem(f"{path} ({option})", f"cannot be read ({e})", "check that it is valid Parquet or JSON Lines")]) from None
    missing = [c for c in wanted if c not in names]
    columns = [c for c in requested if c in names]
    if missing:
        raise DataError([problem(f"{path} ({option})", f"missing column `{c}` (has: {', '.join(names)})", f"set {wanted[c]} to the right column") for c in missing])
    Path(cache_root).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=cache_root))
    problems: list[str] = []
    try:
        n = 0
        for table in _iter_rechunked(batches):
            _write_chunk(tmp / f"chunk-{n // CHUNK:06d}.arrow", table)
            n += table.num_rows
        if n == 0:
            problems.append(problem(f"{path} ({option})", "no rows", f"point {option} at a file with rows"))
        if problems:
            raise DataError(problems)
        (tmp / META).write_text(json.dumps({"n_rows": n, "columns": columns, "source": str(path)}))
        tmp.chmod(0o755)  # mkdtemp makes it 0700: other users' runs read the same store
        try:
            tmp.rename(root)
        except OSError:  # another run built the same store meanwhile: theirs is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Store(str(root), str(path), n, tuple(columns))


def _iter_rechunked(batches):
    """Tables of exactly CHUNK rows (the last one shorter), whatever batch sizes the reader yields."""
    buf: list[pa.Table] = []
    held = 0
    for b in batches:
        buf.append(pa.Table.from_batches([b]))
        held += b.num_rows
        while held >= CHUNK:
            table = pa.concat_tables(buf).combine_chunks()
            yield table.slice(0, CHUNK)
            rest = table.slice(CHUNK)
            buf, held = ([rest] if rest.num_rows else []), rest.num_rows
    if held:
        yield pa.concat_tables(buf).combine_chunks()


def _write_chunk(path: Path, table: pa.Table) -> None:
    import pyarrow.ipc as ipc

    with pa.OSFile(str(path), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
