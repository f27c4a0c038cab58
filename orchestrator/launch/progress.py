"""The progress display of a run: a live bar on a terminal, a line per eval otherwise (ProgressView)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import IO

from jobs.metrics_log import read_metrics


class ProgressView:
    """Tails metrics.jsonl in a thread: a live bar on a terminal, a line per eval otherwise."""

    def __init__(self, run_dir: Path, stream: IO[str], enabled: bool = True):
        self.run_dir, self.stream, self.enabled = run_dir, stream, enabled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProgressView:
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        console = Console(file=self.stream)
        seen = len(read_metrics(self.run_dir))
        progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, transient=False, disable=not console.is_terminal,
            # rich would otherwise swap sys.stdout/stderr for proxies that print above the bar: Ray's worker
            # lines (which the driver prints to sys.stdout) would cover the bar and miss ray.log
            redirect_stdout=False, redirect_stderr=False,
        )
        task = None
        with progress:
            while not self._stop.is_set():
                records = read_metrics(self.run_dir)
                for rec in records[seen:]:
                    if rec.get("event") == "start":
                        task = task if task is not None else progress.add_task("train", total=rec["total_steps"], info="")
                        progress.update(task, completed=rec["step"])
                        if not console.is_terminal:
                            console.print(f"training: {rec['total_steps']} steps, {rec['trainable_params']:,} trainable parameters")
                    elif task is not None and "train_loss" in rec:
                        info = f"loss {rec['train_loss']:.4f}"
                        if "eval_accuracy" in rec:
                            info += f"  eval loss {rec['eval_loss']:.4f}  acc {rec['eval_accuracy']:.1%}"
                        progress.update(task, completed=rec["step"], info=info)
                    if rec.get("event") == "eval" and not console.is_terminal:
                        generated = f", generated {rec['eval_generated_accuracy']:.1%}" if "eval_generated_accuracy" in rec else ""
                        console.print(f"step {rec['step']}: eval loss {rec['eval_loss']:.4f}, accuracy {rec['eval_accuracy']:.1%}{generated}")
                seen = len(records)
                self._stop.wait(0.5)
