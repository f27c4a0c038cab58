"""What the validation pass costs per row in each data layout, and whether it grows with the data.

    .venv/bin/python bench/chat_layouts.py [--rows 1000 4000]

For each layout the same colour rows (the quickstart's tiny LLaVA processor, 64x64 PNGs) are checked and
measured exactly as one validation task does it (jobs/data.py: check_row + measure), in this process, one
thread, and encoded in full (encode_row) on a sample:
- prompt/answer: question, answer and image columns;
- chat parts: HF datasets' layout, content parts + an images list column;
- multi-turn: three user/assistant turns, an image in each user turn (three images a row), loss on every answer.
Reported: ms per row for check + measure, and for a full encode, at each --rows size, with the ratio to
prompt/answer and the growth from the smallest size to the largest (1.0: flat).
Results: bench/results/chat_layouts.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from common import ratio, write_result

ENCODE_SAMPLE = 200


def multi_turn(rows: list[dict[str, Any]], turns: int = 3) -> dict[str, Any]:
    messages, images = [], []
    for r in rows[:turns]:
        messages += [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": r["question"]}]},
            {"role": "assistant", "content": [{"type": "text", "text": r["answer"]}]},
        ]
        images.append({"bytes": r["image"], "path": None})
    return {"messages": messages, "images": images}


def layouts(n: int, out: Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    from orchestrator import tinymodels

    rows = tinymodels.colour_rows(n + 2, seed=0)
    return {
        "prompt/answer": (tinymodels.write_parquet(rows[:n], out / f"plain-{n}.parquet"), {}),
        "chat parts": (tinymodels.write_chat_parquet([tinymodels.as_chat(r) for r in rows[:n]], out / f"chat-{n}.parquet"), {"messages": "messages", "images": "images"}),
        "multi-turn x3": (tinymodels.write_chat_parquet([multi_turn(rows[i : i + 3]) for i in range(n)], out / f"multi-{n}.parquet"), {"messages": "messages", "images": "images"}),
    }


def time_layout(path: Path, columns: dict[str, Any], processor: Any) -> dict[str, float]:
    from jobs.data import check_row, encode_row, measure, read_table
    from orchestrator.config import DataConfig

    cfg = DataConfig(train=str(path), max_length=4096, **columns)
    table = read_table(path).to_pylist()
    t0 = time.perf_counter()
    longest = 0
    for row in table:
        problems, images = check_row(row, cfg, True, path)
        assert not problems, problems
        longest = max(longest, measure(row, cfg, processor, True, images))
    check_ms = 1000 * (time.perf_counter() - t0) / len(table)
    t0 = time.perf_counter()
    for i, row in enumerate(table[:ENCODE_SAMPLE]):
        assert len(encode_row(row, i, cfg, processor, True, path).input_ids) <= longest
    encode_ms = 1000 * (time.perf_counter() - t0) / min(len(table), ENCODE_SAMPLE)
    return {"check_measure_ms_per_row": round(check_ms, 3), "encode_ms_per_row": round(encode_ms, 3), "longest_tokens": longest}


def main() -> None:
    import torch

    from jobs.model import load_processor
    from orchestrator import tinymodels
    from orchestrator.architectures import for_model_dir

    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 4000])
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a validation task
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        model = tinymodels.build_tiny_llava(out / "llava")
        processor = load_processor(str(model), for_model_dir(model))
        results: dict[str, dict[int, dict[str, float]]] = {}
        for n in args.rows:
            for name, (path, columns) in layouts(n, out).items():
                results.setdefault(name, {})[n] = time_layout(path, columns, processor)
    small, large = min(args.rows), max(args.rows)
    base = results["prompt/answer"]
    summary = []
    print(f"| layout | check+measure ms/row ({small} / {large} rows) | growth | vs prompt/answer | full encode ms/row | longest tokens |")
    print("|---|---|---|---|---|---|")
    for name, by_n in results.items():
        row = {
            "layout": name,
            "check_ms_small": by_n[small]["check_measure_ms_per_row"],
            "check_ms_large": by_n[large]["check_measure_ms_per_row"],
            "growth": ratio(by_n[large]["check_measure_ms_per_row"], by_n[small]["check_measure_ms_per_row"]),
            "vs_prompt_answer": ratio(by_n[large]["check_measure_ms_per_row"], base[large]["check_measure_ms_per_row"]),
            "encode_ms": by_n[large]["encode_ms_per_row"],
            "longest": by_n[large]["longest_tokens"],
        }
        summary.append(row)
        print(f"| {name} | {row['check_ms_small']} / {row['check_ms_large']} | {row['growth']} | {row['vs_prompt_answer']} | {row['encode_ms']} | {row['longest']} |")
    write_result("chat_layouts", {"rows": args.rows, "results": {k: {str(n): v for n, v in d.items()} for k, d in results.items()}}, summary)


if __name__ == "__main__":
    main()
