"""What reaches the user's screen during a run, and what goes to RUN_DIR/ray.log instead."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_a_terminal(args: list[str], timeout_s: float = 900) -> tuple[int, str, str]:
    """Run `rayft ARGS` with stderr (and stdin) on a pseudo-terminal and stdout on a pipe, as
    `rayft train --json > out.json` in a terminal: returns (exit code, stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], stdout=subprocess.PIPE, stderr=slave, stdin=slave,
                            text=True, env=env, cwd=REPO)
    os.close(slave)
    screen = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the terminal closed: the process has exited
                break
            if not chunk:
                break
            screen += chunk
        elif proc.poll() is not None:
            break
    stdout = proc.stdout.read() if proc.stdout else ""
    proc.wait(timeout=timeout_s)
    os.close(master)
    return proc.returncode, stdout, ANSI.sub("", screen.decode(errors="replace"))


@pytest.mark.slow
def test_a_run_in_a_terminal_shows_only_rayfts_progress_and_json_goes_alone_to_stdout(world, tmp_path):
    """`rayft train --json` on a terminal: stdout is exactly the JSON manifest; the terminal shows rayft's own
    lines and its progress bar, and nothing of Ray's (no worker lines, warnings or tracebacks): those,
    every worker's included, are in RUN_DIR/ray.log."""
    code, stdout, screen = run_on_a_terminal(
        # data.encode_once: off, so that the worker's micro batches come through a Ray Data stream (rows encoded once
        # on this machine are read by the worker itself) and Ray Data's lines are among those kept off the screen
        ["train", str(world / "jobs" / "base.yaml"), "--json", "--set", f"output={tmp_path}", "--set", "train.epochs=1", "--set", "data.encode_once=off"])
    assert code == 0, screen[-3000:]
    manifest = json.loads(stdout)  # nothing but the JSON
    run_dir = Path(manifest["run_dir"])
    assert "run directory:" in screen and "32/32" in screen, screen[-2000:]
    ray_lines = [line for line in screen.splitlines() if "pid=" in line or "WARNING" in line or "Traceback" in line or "INFO" in line]
    assert not ray_lines, ray_lines[:10]
    log = (run_dir / "ray.log").read_text()
    worker_lines = [line for line in log.splitlines() if "pid=" in line]
    assert worker_lines and "Starting execution of Dataset" in log, log[-2000:]  # Ray Data's lines, from the worker's stream
