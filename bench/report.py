"""One markdown table from every bench/results/*.json, written into docs/benchmarks.md between the markers
`<!-- bench:begin -->` and `<!-- bench:end -->` (and printed).

    .venv/bin/python bench/report.py

Results written through bench/common.write_result carry their own `summary` rows; the four results that
predate it (methods, zero_memory, search_compare, planner_calibration) are summarised here from their fields.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
ORDER = ["hf_compare", "data_scale", "length_batching", "vlm_lead_51m", "vlm_lead_rayft_train", "vlm_lead", "vlm_lead_accuracy", "hardware", "overhead", "search_trials", "cluster_submit", "methods", "zero_memory", "search_compare", "planner_calibration", "claims", "tracking_overhead"]


def _methods(d: dict[str, Any]) -> list[dict[str, Any]]:
    m = d["methods"]
    full = m["full"]["steps_per_s"]
    return [
        {"benchmark": "method speed (tiny VLM, rayft train)", "measure": f"{name} steps/s vs full", "rayft": round(r["steps_per_s"], 1),
         "baseline": round(full, 1), "ratio": round(r["steps_per_s"] / full, 2), "note": "238k params, micro batch 16, bf16, 1 worker"}
        for name, r in m.items() if name != "full"
    ]


def _zero(d: dict[str, Any]) -> list[dict[str, Any]]:
    stages = d["stages"]
    s0 = stages["0"]
    return [
        {"benchmark": "ZeRO per-worker memory (57.2M VLM, 2 workers)", "measure": f"stage {k}: params+grads+optimizer MiB / step s",
         "rayft": f"{v['total_mib']:.0f} / {v['step_s']:.2f}", "baseline": f"{s0['total_mib']:.0f} / {s0['step_s']:.2f}",
         "ratio": round(v["total_mib"] / s0["total_mib"], 2), "note": "baseline: stage 0 (plain data parallel); ratio of memory"}
        for k, v in stages.items() if k != "0"
    ]


def _search(d: dict[str, Any]) -> list[dict[str, Any]]:
    rule = d["combined_asha_accuracy"]["5/8 (step 20), rf 3"]  # the default (orchestrator/config/tune.py TuneConfig)
    return [
        {"benchmark": "ASHA (default rule) vs FIFO, 2 tasks x 12-trial grids, replayed", "measure": "trial-steps, worst run",
         "rayft": rule["max_cost_ratio"], "baseline": 1.0, "ratio": rule["max_cost_ratio"],
         "note": f"best accuracy gap {rule['worst_gap']:+.3f}; FIFO's best kept in {rule['kept_best']}/{rule['runs']} more orderings"},
    ]


def _planner(d: dict[str, Any]) -> list[dict[str, Any]]:
    ratios = [r["ratio"] for r in d["rows"]]
    return [
        {"benchmark": "memory planner calibration", "measure": "predicted / measured weights+grads+optimizer",
         "rayft": f"{min(ratios):.3f}-{max(ratios):.3f}", "baseline": None, "ratio": round(statistics.median(ratios), 3),
         "note": f"{len(ratios)} configurations: tiny and 57M, full/lora/qlora, ZeRO 1-3"},
    ]


LEGACY = {"methods": _methods, "zero_memory": _zero, "search_compare": _search, "planner_calibration": _planner}


def rows() -> list[dict[str, Any]]:
    out = []
    names = sorted((p.stem for p in RESULTS.glob("*.json")), key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    for name in names:
        data = json.loads((RESULTS / f"{name}.json").read_text())
        summary = data.get("summary") or (LEGACY[name](data) if name in LEGACY else [])
        # a README row names its benchmark; other summaries (chat_accuracy's per-arch table) stay in their file
        out.extend({**r, "file": f"bench/results/{name}.json"} for r in summary if "benchmark" in r)
    return out


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def table() -> str:
    lines = ["| benchmark | measure | rayft | baseline | ratio | note |", "|---|---|---|---|---|---|"]
    for r in rows():
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['benchmark']} | {r['measure']} | {_cell(r.get('rayft'))} | {_cell(r.get('baseline'))} | {ratio} | {r.get('note') or ''} |")
    return "\n".join(lines)


def main() -> None:
    text = table()
    readme = REPO / "docs" / "benchmarks.md"
    body = readme.read_text()
    if BEGIN in body and END in body:
        head, rest = body.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        readme.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")
        print(f"docs/benchmarks.md table regenerated ({text.count(chr(10)) - 1} rows)")
    print(text)


if __name__ == "__main__":
    main()
