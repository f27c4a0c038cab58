"""The LoRA/QLoRA export at scale: peak RSS and wall time of `rayft merge`, streamed against in memory, on text
Llama models of 0.1B, 0.5B and 1.5B parameters; then what the same export needs at 70B, from the planner's shapes.

    scripts/netns.sh .venv/bin/python bench/export_scale.py [--sizes 0.1B,0.5B,1.5B] [--workdir /tmp/export_scale]

Each model is built from a LlamaConfig (random init, vocabulary 32000 around the colour task's WordLevel tokenizer)
and saved in bf16 in 200 MB shards, in a child process that exits before anything is measured. A short QLoRA run
(`rayft train`: nf4, rank 16 over q,k,v,o,gate,up,down, a few steps on text rows) makes the checkpoint; then
`rayft merge RUN_DIR --json` runs as a fresh process per variant, each on its own copy of the run directory:
- streamed: export.merge streamed, export.parity_memory 0 (the per-layer probe check only);
- streamed+e2e: streamed with the end-to-end logits check (parity_memory auto: it runs where the host has room);
- in_memory: export.merge in_memory (peft's merge_and_unload on the whole fp32 model).
Peak RSS is the merge process's maximum resident set (/usr/bin/time -v; mapped shard pages count); a watchdog
kills a merge whose resident memory passes --memory-limit-gib. The streamed and in-memory outputs are compared
tensor by tensor (bit-equal count). Results: bench/results/export_scale.json and export_scale.md.

The runs train at lr 2e-3 (no warmup): at the default 2e-4, two steps leave an adapter delta of ~0.2% of |W|, below
bf16's resolution; 61% of its elements round away in the bf16 export and the end-to-end check rightly fails
(max |logit diff| 0.218 against a tolerance of 0.123, streamed and in memory alike). At 2e-3 the delta is ~2% of |W|.

The 70B figure: memory_needed's formula from the planner's Llama-2-70B shapes packed into ~5 GB hub shards, and the
streamed peak fitted here (runtime + adapter + a x largest input shard + b x largest tensor in fp32). b is
identified from the embedding / lm_head (the largest tensors at these sizes: cast to fp32 and back, not adapted);
an adapted 4-bit weight makes more transient copies (dequantized, delta, merged), so at 70B, where an MLP weight
(0.94 GB in fp32) is nearly as large as the embedding, the fit may read low by a GB or two.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import REPO, ratio, write_result

GiB, MB = 2**30, 10**6
VOCAB = 32000
# Llama-shaped text decoders (grouped-query attention as in Llama 3), untied embeddings as in Llama 2.
SHAPES: dict[str, dict[str, int]] = {
    "0.1B": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8, "num_attention_heads": 12, "num_key_value_heads": 4},
    "0.5B": {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 14, "num_attention_heads": 12, "num_key_value_heads": 4},
    "1.5B": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 8},
}
VARIANTS: dict[str, dict[str, str]] = {
    "streamed": {"merge": "streamed", "parity_memory": "0"},
    "streamed+e2e": {"merge": "streamed", "parity_memory": "auto"},
    "in_memory": {"merge": "in_memory", "parity_memory": "auto"},
}
RAYFT = [sys.executable, "-c", "from orchestrator.cli import main; main()"]  # cli.py has no __main__
HUB_SHARD = 5 * 10**9  # a 70B hub checkpoint: ~5 GB bf16 shards (model-000NN-of-00029 ~4.7 GB and the like)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".venv" / "torch_extensions")}


def build_model(size: str, out: Path) -> None:
    """In a child process: random bf16 LlamaForCausalLM, 200 MB shards, the colour tokenizer beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from orchestrator import tinymodels

    tokenizer = tinymodels.build_tokenizer()
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, **SHAPES[size])
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: 3 GB at 1.5B instead of 6
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="200MB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def write_data(work: Path) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator import tinymodels

    names = list(tinymodels.COLOURS)
    q = tinymodels.QUESTIONS["english"]
    paths = []
    for name, n in (("train", 64), ("eval", 4)):
        path = work / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist([{"question": q, "answer": names[i % len(names)]} for i in range(n)]), path)
        paths.append(path)
    return paths[0], paths[1]


def train(size: str, model: Path, data: tuple[Path, Path], work: Path, steps: int, lr: float) -> tuple[Path, float]:
    import yaml

    job = {
        "name": f"qlora-{size}", "model": str(model), "output": str(work / "runs"), "method": "qlora", "precision": "bf16",
        "data": {"train": str(data[0]), "eval": str(data[1]), "max_length": 32},
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.0},
        "train": {"max_steps": steps, "lr": lr, "warmup_ratio": 0.0, "epochs": 1, "micro_batch_size": 1, "eval_every": 10**6, "checkpoint_every": 10**6, "log_every": 1},
        "scaling": {"workers": 1, "gpu": "off"},
        "export": {"parity_memory": "0"},  # the run's own export: layer check only (the bench measures `rayft merge`)
    }
    job_file = work / f"qlora-{size}.yaml"
    job_file.write_text(yaml.safe_dump(job))
    t0 = time.time()
    cmd = [*RAYFT, "train", str(job_file), "--no-progress", "--no-fit-check", "--json"]
    proc = subprocess.run(cmd, env=env(), capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"rayft train failed ({size}):\n{(proc.stderr or proc.stdout)[-3000:]}")
    return Path(json.loads(proc.stdout[proc.stdout.index("{\n"):])["run_dir"]), time.time() - t0


def variant_dir(run_dir: Path, work: Path, size: str, name: str, export: dict[str, str]) -> Path:
    """A copy of the run directory (without its model/) whose job.yaml asks for this export."""
    import yaml

    out = work / "merges" / f"{size}-{name.replace('+', '-')}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run_dir, out, ignore=shutil.ignore_patterns("model", "model.partial", "model.failed"))
    job = yaml.safe_load((out / "job.yaml").read_text())
    job["export"] = {**job.get("export", {}), **export}
    (out / "job.yaml").write_text(yaml.safe_dump(job))
    return out


class Watchdog:
    """Every 0.2 s: the resident memory of the process tree under `root`; kills the tree above the limit."""

    def __init__(self, root: int, limit: int) -> None:
        self.root, self.limit, self.peak, self.killed = root, limit, 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        pids, i = [self.root], 0
        while i < len(pids):
            try:
                pids += [int(c) for c in Path(f"/proc/{pids[i]}/task/{pids[i]}/children").read_text().split()]
            except OSError:
                pass
            i += 1
        return pids

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = 0
            for pid in self._tree():
                try:
                    rss += int(next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS")).split()[1]) * 1024
                except (OSError, StopIteration):
                    pass
            self.peak = max(self.peak, rss)
            if rss > self.limit and not self.killed:
                self.killed = True
                os.killpg(self.root, signal.SIGKILL)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure_merge(run_dir: Path, limit: int) -> dict[str, Any]:
    rss_file = run_dir / "time-v.txt"
    cmd = ["/usr/bin/time", "-v", "-o", str(rss_file), *RAYFT, "merge", str(run_dir), "--json"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, start_new_session=True)
    dog = Watchdog(proc.pid, limit)
    stdout, stderr = proc.communicate()
    dog.stop()
    out: dict[str, Any] = {"wall_s": round(time.time() - t0, 1), "exit": proc.returncode, "load_1m": os.getloadavg()[0]}
    if dog.killed:
        return out | {"did_not_fit": f"killed above {limit / GiB:.0f} GiB resident", "peak_rss_gib": round(dog.peak / GiB, 2)}
    maxrss = next(int(x.split(":")[1]) for x in rss_file.read_text().splitlines() if "Maximum resident set size" in x) * 1024
    out["peak_rss_gib"] = round(maxrss / GiB, 3)
    if proc.returncode != 0:
        failed = [x for x in (stderr + stdout).splitlines() if x.startswith("export failed")]
        return out | {"error": failed[-1] if failed else (stderr or stdout)[-2000:]}
    parity = json.loads(stdout[stdout.index("{\n"):])["parity"]
    out["checks"] = {k: ("passed" if c.get("passed") else "FAILED") if c.get("ran") else f"skipped: {c.get('reason')}" for k, c in parity["checks"].items()}
    out.update({k: parity.get(k) for k in ("merge", "shards", "merge_s", "export_s", "fp32_bytes")})
    out["parity"] = parity
    return out


def _predict(run_dir: str, queue: Any) -> None:
    from jobs.export_stream import memory_needed
    from orchestrator import launch
    from orchestrator.config import build_job, load_raw

    job, _ = build_job(load_raw(Path(run_dir) / "job.yaml"))
    queue.put(memory_needed(job, launch.latest_checkpoint(Path(run_dir))))


def _compare(a: str, b: str, queue: Any) -> None:
    """Every tensor of export a against export b (one tensor at a time, memory-mapped)."""
    import torch
    from safetensors import safe_open

    def keys(d: Path) -> dict[str, Path]:
        index = d / "model.safetensors.index.json"
        if index.is_file():
            return {k: d / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        with safe_open(d / "model.safetensors", "pt") as f:
            return {k: d / "model.safetensors" for k in f.keys()}

    ka, kb = keys(Path(a)), keys(Path(b))
    equal, worst, dtypes = 0, 0.0, set()
    for k in sorted(set(ka) & set(kb)):
        with safe_open(ka[k], "pt") as fa, safe_open(kb[k], "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
        dtypes.add(f"{x.dtype}/{y.dtype}")
        if x.dtype == y.dtype and torch.equal(x, y):
            equal += 1
        else:
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    queue.put({"tensors": len(set(ka) | set(kb)), "common": len(set(ka) & set(kb)), "bit_equal": equal, "max_abs_diff_unequal": worst,
               "only_streamed": sorted(set(ka) - set(kb))[:5], "only_in_memory": sorted(set(kb) - set(ka))[:5], "dtypes": sorted(dtypes)})


def _runtime(queue: Any) -> None:
    """Resident memory of a process that has imported what the export imports, before it reads a weight."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import jobs.export_stream  # noqa: F401
    import jobs.merge  # noqa: F401
    import orchestrator.launch  # noqa: F401

    queue.put(int(next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS")).split()[1]) * 1024)


def in_child(target: Any, *args: Any) -> Any:
    """Run target(*args, queue) in a fresh spawned process (its memory is returned when it exits)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, queue))
    p.start()
    result = queue.get()
    p.join()
    if p.exitcode != 0:
        sys.exit(f"{target.__name__}{args} failed (exit {p.exitcode})")
    return result


def _build(size: str, out: str, queue: Any) -> None:
    build_model(size, Path(out))
    queue.put(None)


def seventy_b(adapter_bytes_per_param: float, fit: dict[str, float] | None, runtime_gib: float) -> dict[str, Any]:
    """The 70B export from the planner's shapes: a hub checkpoint in ~5 GB bf16 shards, packed in state-dict order."""
    from jobs.export_stream import RUNTIME_BYTES
    from jobs.merge import end_to_end_bytes
    from orchestrator import planner
    from orchestrator.config import JobConfig

    shape = planner.load_shape("70B")
    job = JobConfig.model_validate({"model": "70B", "data": {"train": "rows.parquet"}, "method": "qlora", "lora": {"rank": 16}})
    shards, current = [], 0
    for t in shape.tensors:
        if current and current + 2 * t.numel > HUB_SHARD:
            shards.append(current)
            current = 0
        current += 2 * t.numel
    shards.append(current)
    targets = planner.lora_target_tensors(job, shape)
    lora_params = sum(job.lora.rank * (t.linear[0] + t.linear[1]) for t in targets if t.linear)
    adapter = int(lora_params * adapter_bytes_per_param)
    largest = max(shards)  # bf16 in, bf16 out: the output shard has the input's elements at the same size
    # memory_needed's formula (jobs/export_stream.py): input shard + 2 x output shard + 4 fp32 copies of the largest tensor
    streamed = largest + 2 * largest + 16 * max(t.numel for t in shape.tensors) + adapter + RUNTIME_BYTES
    fp32 = 4 * shape.total_params
    out = {"params": shape.total_params, "fp32_gb": fp32 / 1e9, "hub_shards": len(shards), "largest_shard_gb": largest / 1e9,
           "lora_targets": len(targets), "adapter_params": lora_params, "adapter_gb": adapter / 1e9,
           "streamed_memory_needed_gb": streamed / 1e9, "streamed_share_of_fp32": streamed / fp32,
           "in_memory_needed_gb": 3 * fp32 / 1e9, "end_to_end_check_gb": end_to_end_bytes(fp32) / 1e9}
    if fit:  # as measured here: runtime + adapter + a x the largest input shard + b x the largest tensor in fp32
        tensor = 4 * max(t.numel for t in shape.tensors)
        out["largest_tensor_fp32_gb"] = tensor / 1e9
        out["streamed_from_fit_gb"] = (runtime_gib * GiB + adapter + fit["per_shard_byte"] * largest + fit["per_fp32_tensor_byte"] * tensor) / 1e9
    return out


def largest_tensor(model: Path) -> int:
    from orchestrator import planner

    return 4 * max(t.numel for t in planner.shape_from_config(json.loads((model / "config.json").read_text())).tensors)


def shard_check(size: str, r: dict[str, Any], work: Path, limit: int) -> dict[str, Any]:
    """The streamed export of `size` re-saved in 1 GB shards (the same weights, adapter and run)."""
    import yaml

    model = work / f"llama-{size}-1GB"
    if not (model / "config.json").is_file():
        in_child(_reshard, str(work / f"llama-{size}"), str(model))
    vdir = variant_dir(Path(r["run_dir"]), work, size, "streamed-1GB", VARIANTS["streamed"])
    job = yaml.safe_load((vdir / "job.yaml").read_text())
    job["model"] = str(model)
    (vdir / "job.yaml").write_text(yaml.safe_dump(job))
    v = measure_merge(vdir, limit)
    v.update(size=size, largest_in_mb=largest_file(model), largest_out_mb=largest_file(written(vdir)), predicted_gib=in_child(_predict, str(vdir)) / GiB,
             largest_tensor_fp32_mb=largest_tensor(model) / MB, adapter_mb=r["adapter_mb"], fp32_gib=r["fp32_gib"])
    v["bit_equal_to_200MB_shards"] = in_child(_compare, str(written(vdir)), str(written(work / "merges" / f"{size}-streamed")))
    print(f"  {size} streamed, 1 GB shards: peak {v['peak_rss_gib']:.2f} GiB, {v['wall_s']:.0f}s, {v.get('checks') or v.get('error')}", flush=True)
    return v


def _reshard(src: str, out: str, queue: Any) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(out, max_shard_size="1GB")
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    queue.put(None)


def peak_fit(results: dict[str, Any], work: Path, runtime_gib: float) -> dict[str, Any] | None:
    """Least squares over every streamed export (layer check only): peak - runtime - adapter = a x largest input
    shard + b x largest tensor in fp32 (the transient fp32 copies of one weight)."""
    import numpy as np

    points = [(s["variants"]["streamed"] | {"largest_in_mb": s["largest_in_mb"], "adapter_mb": s["adapter_mb"],
                                            "largest_tensor_fp32_mb": largest_tensor(work / f"llama-{size}") / MB})
              for size, s in results["sizes"].items() if "checks" in s["variants"].get("streamed", {})]
    if "checks" in results.get("shard_check", {}):
        points.append(results["shard_check"])
    if len(points) < 2:
        return None
    x = np.array([[p["largest_in_mb"] * MB, p["largest_tensor_fp32_mb"] * MB] for p in points])
    y = np.array([p["peak_rss_gib"] * GiB - runtime_gib * GiB - p["adapter_mb"] * MB for p in points])
    (a, b), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"per_shard_byte": float(a), "per_fp32_tensor_byte": float(b), "points": len(points),
            "max_abs_residual_gib": float(np.abs(x @ np.array([a, b]) - y).max() / GiB)}


def table(results: dict[str, Any]) -> str:
    lines = ["| model | params | fp32 GiB | largest shard in / out MB | variant | peak RSS GiB | peak / fp32 | predicted GiB | wall s | load | checks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [(size, r, name, v) for size, r in results["sizes"].items() for name, v in r["variants"].items()]
    if "shard_check" in results:
        c = results["shard_check"]
        rows.append((f"{c['size']} (1 GB shards)", {**results["sizes"][c["size"]], **c}, "streamed", c))
    for size, r, name, v in rows:
        pred = f"{r['predicted_gib']:.2f}" if name != "in_memory" else ""
        peak = f"{v['peak_rss_gib']:.2f}" + (" (killed)" if v.get("did_not_fit") else "")
        load = f"{v['load_1m']:.1f}" if "load_1m" in v else ""
        checks = "; ".join(f"{k}: {c}" for k, c in v.get("checks", {}).items()) or v.get("did_not_fit") or v.get("error", "").replace("|", "/")
        lines.append(f"| {size} | {r['params'] / 1e9:.3f}B | {r['fp32_gib']:.2f} | {r['largest_in_mb']:.0f} / {v.get('largest_out_mb', 0):.0f} | {name} | "
                     f"{peak} | {v['peak_rss_gib'] / r['fp32_gib']:.3f} | {pred} | {v['wall_s']:.0f} | {load} | {checks} |")
    return "\n".join(lines)


def written(vdir: Path) -> Path:
    """The export: model/, or model.failed where a check failed (kept unpublished, still comparable)."""
    return vdir / "model" if (vdir / "model").is_dir() else vdir / "model.failed"


def largest_file(d: Path) -> float:
    files = list(d.glob("model*.safetensors"))
    return max(f.stat().st_size for f in files) / MB if files else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="0.1B,0.5B,1.5B")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/export_scale"))
    ap.add_argument("--steps", type=int, default=2, help="QLoRA steps per run (1 at 1.5B)")
    ap.add_argument("--lr", type=float, default=2e-3, help="large enough that a few steps' adapter survives bf16 rounding (see the docstring)")
    ap.add_argument("--memory-limit-gib", type=float, default=20.0)
    ap.add_argument("--shard-check", default="0.5B", help="also export this size re-saved in 1 GB shards (the peak's dependence on shard size)")
    ap.add_argument("--keep", action="store_true", help="reuse the sizes already in bench/results/export_scale.json")
    ap.add_argument("--reuse-runs", action="store_true", help="measure the merges again on the QLoRA runs recorded there (no training)")
    args = ap.parse_args()
    if os.environ.get("RAYFT_IN_NETNS") != "1":
        sys.exit("run it inside scripts/netns.sh (rayft train starts Ray)")
    from orchestrator import planner

    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    data = write_data(work)
    results: dict[str, Any] = {"sizes": {}, "setup": {"shapes": SHAPES, "vocab": VOCAB, "shard": "200MB", "method": "qlora nf4, rank 16, bf16",
                                                        "memory_limit_gib": args.memory_limit_gib}}
    saved = REPO / "bench" / "results" / "export_scale.json"
    prior = json.loads(saved.read_text())["sizes"] if (args.keep or args.reuse_runs) and saved.is_file() else {}
    results["code_sha256"] = {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:16] for f in ("jobs/export_stream.py", "jobs/merge.py")}
    t_all = time.time()
    for size in args.sizes.split(","):
        if args.keep and size in prior:
            results["sizes"][size] = prior[size]
            print(f"{size}: kept from {saved.relative_to(REPO)}", flush=True)
            continue
        model = work / f"llama-{size}"
        if not (model / "config.json").is_file():
            t0 = time.time()
            in_child(_build, size, str(model))
            print(f"{size}: built in {time.time() - t0:.0f}s", flush=True)
        if args.reuse_runs and size in prior and Path(prior[size]["run_dir"]).is_dir():
            run_dir, train_s, steps = Path(prior[size]["run_dir"]), prior[size]["train_s"], prior[size]["train_steps"]
        else:
            steps = 1 if size == "1.5B" else args.steps
            run_dir, train_s = train(size, model, data, work, steps, args.lr)
        print(f"{size}: trained {steps} steps in {train_s:.0f}s -> {run_dir}", flush=True)
        adapter = next(run_dir.glob("checkpoints/*/*.safetensors"))
        r: dict[str, Any] = {"run_dir": str(run_dir), "train_s": round(train_s, 1), "train_steps": steps,
                             "largest_in_mb": largest_file(model), "adapter_mb": adapter.stat().st_size / MB,
                             "predicted_gib": in_child(_predict, str(run_dir)) / GiB, "largest_tensor_fp32_mb": largest_tensor(model) / MB, "variants": {}}
        r["code_sha256"] = {f: hashlib.sha256((REPO / f).read_bytes()).hexdigest()[:16] for f in ("jobs/export_stream.py", "jobs/merge.py")}
        r["params"] = planner.shape_from_config(json.loads((model / "config.json").read_text())).total_params
        r["fp32_gib"] = 4 * r["params"] / GiB
        for name in args.variants.split(","):
            vdir = variant_dir(run_dir, work, size, name, VARIANTS[name])
            v = measure_merge(vdir, int(args.memory_limit_gib * GiB))
            v["largest_out_mb"] = largest_file(written(vdir))
            r["variants"][name] = v
            print(f"  {size} {name}: peak {v['peak_rss_gib']:.2f} GiB, {v['wall_s']:.0f}s, {v.get('checks') or v.get('did_not_fit') or v.get('error')}", flush=True)
        a, b = (written(work / "merges" / f"{size}-{name}") for name in ("streamed", "in_memory"))
        if "streamed" in r["variants"] and "in_memory" in r["variants"] and a.is_dir() and b.is_dir():
            r["streamed_vs_in_memory"] = in_child(_compare, str(a), str(b))
            print(f"  {size} streamed vs in_memory: {r['streamed_vs_in_memory']}", flush=True)
        results["sizes"][size] = r
        write_result("export_scale", results)  # nothing lost if stopped
    if args.shard_check in results["sizes"]:
        results["shard_check"] = shard_check(args.shard_check, results["sizes"][args.shard_check], work, int(args.memory_limit_gib * GiB))
    results["runtime_rss_gib"] = runtime = in_child(_runtime) / GiB
    results["fit"] = fit = peak_fit(results, work, runtime)
    big_size, big = list(results["sizes"].items())[-1]  # the adapter's bytes per parameter, from the largest model
    lora_params = 16 * SHAPES[big_size]["num_hidden_layers"] * sum(a + b for a, b in _projections(SHAPES[big_size]))
    results["70B"] = seventy_b(big["adapter_mb"] * MB / lora_params, fit, runtime)
    results["wall_s"] = round(time.time() - t_all)
    summary = []
    bench = "export at scale (text Llama, QLoRA rank 16, 200 MB shards)"
    for size, s in results["sizes"].items():
        st, im = s["variants"].get("streamed", {}), s["variants"].get("in_memory", {})
        if "peak_rss_gib" in st:
            summary.append({"benchmark": bench, "measure": f"{size}: merge peak RSS / fp32 size", "rayft": round(st["peak_rss_gib"] / s["fp32_gib"], 3),
                            "baseline": round(im["peak_rss_gib"] / s["fp32_gib"], 3) if im.get("checks") else None,
                            "ratio": ratio(st["peak_rss_gib"], im.get("peak_rss_gib")) if im.get("checks") else None,
                            "note": f"streamed (layer check) vs in_memory; fp32 {s['fp32_gib']:.2f} GiB; target < 0.3 at the largest"})
    seventy = results["70B"]
    summary.append({"benchmark": bench, "measure": "70B (planner shapes): streamed export needs GB", "rayft": round(seventy["streamed_memory_needed_gb"], 1),
                    "baseline": round(seventy["in_memory_needed_gb"]), "ratio": round(seventy["streamed_memory_needed_gb"] / seventy["in_memory_needed_gb"], 4),
                    "note": f"{seventy['hub_shards']} hub shards of <= 5 GB; in memory ~3x fp32"})
    write_result("export_scale", results, summary=summary)
    md = table(results) + "\n\npredicted: jobs.export_stream.memory_needed; load: the 1-minute load average at the end (2 cores, shared).\n"
    md += "\nstreamed vs in_memory outputs: " + "; ".join(f"{k}: {s['streamed_vs_in_memory']['bit_equal']}/{s['streamed_vs_in_memory']['tensors']} tensors bit-equal"
                                                     for k, s in results["sizes"].items() if "streamed_vs_in_memory" in s)
    if fit:
        md += (f"\n\nstreamed peak fit ({fit['points']} exports): {runtime:.2f} GiB runtime + adapter + {fit['per_shard_byte']:.2f} x largest input shard "
               f"+ {fit['per_fp32_tensor_byte']:.2f} x largest tensor in fp32 (max residual {fit['max_abs_residual_gib']:.3f} GiB)")
    md += "\n\n70B (Llama-2-70B shapes from orchestrator/planner/shapes.py, hub checkpoint in ~5 GB bf16 shards):\n\n" + "\n".join(
        f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in seventy.items())
    (REPO / "bench" / "results" / "export_scale.md").write_text(f"# export_scale\n\n{md}\n")
    print(md)


def _projections(shape: dict[str, int]) -> list[tuple[int, int]]:
    """(in, out) of q, k, v, o, gate, up, down for one decoder layer."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


if __name__ == "__main__":
    main()
