"""Read the records of a W&B offline run file (run-<id>.wandb): a LevelDB-style log of protobuf Records
(wandb 0.31 has no Python reader of its own; `wandb sync` is what reads them)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7  # ":W&B" + magic (2 bytes) + version, then 7-byte record headers: crc32c, length, type


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, buf, chunks = HEADER, b"", []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 1:  # full
            chunks.append(chunk)
        elif kind == 2:  # first
            buf = chunk
        elif kind == 3:  # middle
            buf += chunk
        elif kind == 4:  # last
            chunks.append(buf + chunk)
    for raw in chunks:
        record = pb.Record()
        record.ParseFromString(raw)
        yield record


def history(path: Path) -> list[dict[str, Any]]:
    return [
        {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
        for r in records(path) if r.WhichOneof("record_type") == "history"
    ]


def config(path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records(path):
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for u in updates:
            out[u.key or "/".join(u.nested_key)] = json.loads(u.value_json)
    return out


def artifacts(path: Path) -> list[str]:
    return [r.artifact.name for r in records(path) if r.WhichOneof("record_type") == "artifact"]
