"""What the controller checks first (`rayft train`: on a thread while Ray starts), so that a broken input fails in seconds, not inside a worker:
each data file's row store (schema, row counts: jobs/rowstore.py), and the model directory:
its config and processor load, and its chat template renders a row of the data.

Every row is then checked in full by the Ray Data validation pass (jobs/stream.py: index).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs import rowstore
from jobs.rowstore import DataError, problem
from orchestrator import architectures
from orchestrator.config import JobConfig

ROWS_TRIED = 8  # rows the template is tried on: bad rows are the validation pass's to report


def check(job: JobConfig, cache_root: Path) -> tuple[dict[str, rowstore.Store], list[str]]:
    """(the row stores that could be built, the problems of the files that could not). Raises DataError at
    once when the model fails (nothing can be checked further without its processor); otherwise a caller
    runs the validation pass over the stores it has and reports its rows' problems with these."""
    from jobs.stream import build_stores

    problems: list[str] = []
    stores: dict[str, rowstore.Store] = {}
    for which in ("train", "eval"):
        try:
            stores.update(build_stores(job, cache_root, only=which))
        except DataError as e:
            problems.extend(e.problems)
    found = model_problems(job, stores.get("train") or stores.get("eval"))
    if found:
        raise DataError(found + problems)
    return stores, problems


def checked_stores(job: JobConfig, cache_root: Path) -> dict[str, rowstore.Store]:
    """check(), raising DataError for any problem (callers that run no validation pass themselves)."""
    stores, problems = check(job, cache_root)
    if problems:
        raise DataError(problems)
    return stores


def model_problems(job: JobConfig, store: rowstore.Store | None) -> list[str]:
    """The model's config and processor load, and the processor encodes a row of the training data
    (chat template, image processor): [] when they do, else what failed and the fix."""
    if not (Path(job.model_dir) / "config.json").is_file():
        return []  # a hub id: checked where the hub is reachable (config validation has warned)
    where = f"model ({job.model})"
    try:
        arch = architectures.for_model_dir(job.model_dir)
    except architectures.UnknownArchitecture:
        return []  # config validation has decided (warned, or refused with lora.targets: auto)
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(job.model_dir)
    except Exception as e:
        return [problem(where, f"config.json does not load ({type(e).__name__}: {_short(e)})", "point model at a Hugging Face model directory saved by save_pretrained")]
    try:
        from jobs.stream import processor_for

        processor = processor_for(job.model_dir)  # kept: the in-process validation pass uses it next
    except Exception as e:
        return [problem(where, f"its processor does not load ({type(e).__name__}: {_short(e)})", "save the processor beside the weights (processor.save_pretrained(model_dir))")]
    if store is None:
        return []
    return _template_problems(job, store, processor, arch, where)


def _template_problems(job: JobConfig, store: rowstore.Store, processor: Any, arch: architectures.Architecture, where: str) -> list[str]:
    from jobs.data import check_row, encode_row

    vlm = arch.kind == "vlm"
    data_file = Path(store.data_file)
    for i, row in enumerate(store.take(range(min(ROWS_TRIED, store.n_rows)))):
        if check_row(row, job.data, vlm, data_file, arch.max_images)[0]:
            continue  # a bad row: the validation pass names it
        try:
            encode_row(row, i, job.data, processor, vlm, data_file)
        except Exception as e:
            fix = getattr(e, "fix", "") or (
                "give the model a chat template that takes these messages (tokenizer.chat_template), or change the data's layout (see docs/data.md)"
            )
            return [problem(where, f"cannot encode row {i} of {data_file}: {getattr(e, 'what', f'{type(e).__name__}: {_short(e)}')}", fix)]
        return []
    return []


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else ""
