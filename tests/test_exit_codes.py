"""Every command leaves through one map (cli.exit_for): 0 ok, 1 the run failed, 2 bad input, 130 / 143
interrupted. Under --json, stdout holds nothing but the result and an error is JSON on stderr.

The kinds that need a training run are tested where the run is: `rayft train` 1 (test_tracking: a tracking
server that refuses), 130 (test_train: Ctrl-C) and 143 (test_faults: SIGTERM); `rayft tune` 143 (test_tune);
`rayft merge` 1 (test_export: a disk that fills). Here: every command's bad input, and the run failures
that need no training (a cluster that is not there, a checkpoint that does not load).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from orchestrator import cli
from orchestrator.processes import free_port

REPO = Path(__file__).resolve().parent.parent


def commands(group: click.Group = cli.main, prefix: str = "") -> dict[str, click.Command]:
    found: dict[str, click.Command] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found.update(commands(command, f"{prefix}{name} "))
        else:
            found[prefix + name] = command
    return found


def test_every_command_leaves_through_the_one_exit_map():
    unhandled = [name for name, command in commands().items() if not getattr(command.callback, "handled", False)]
    assert not unhandled, f"commands without @handled (their exceptions would be tracebacks): {unhandled}"


def test_each_kind_of_failure_has_its_exit_code():
    from jobs.rowstore import DataError
    from orchestrator import planner
    from orchestrator.cluster import ClusterError
    from orchestrator.config import ConfigError, Problem
    from orchestrator.launch import Interrupted, RunFailed
    from orchestrator.remote import RemoteError

    def raised(e: BaseException) -> BaseException:  # with a traceback, as the commands raise them
        try:
            raise e
        except BaseException as caught:
            return caught

    cases = {
        ConfigError([Problem("train.lr", "must be > 0", "e.g. 1e-4"), Problem("method", "unknown")]): 2,
        DataError(["a.jsonl row 3: no `answer`\n    fix: add it"]): 2,
        planner.DoesNotFit("27 GiB > 24 GiB"): 2,
        planner.PlanError("no config.json"): 2,
        cli.BadInput("give a job file"): 2,
        RunFailed("training failed: boom"): 1,
        RemoteError("cannot reach http://127.0.0.1:1"): 1,
        ClusterError("no cluster in DIR"): 1,
        OSError(28, "No space left on device"): 1,
        ValueError("a bug"): 1,
        Interrupted("stopped by SIGTERM; continue with: ...", 143): 143,
        Interrupted("stopped by SIGINT (Ctrl-C); continue with: ...", 130): 130,
        KeyboardInterrupt(): 130,
    }
    for e, code in cases.items():
        got, message, problems = cli.exit_for(raised(e))
        assert got == code, (e, got)
        assert message, e
    config = cli.exit_for(next(iter(cases)))
    assert config[1] == "2 problem(s) in the job:" and config[2][0] == "train.lr: must be > 0\n    fix: e.g. 1e-4"
    bug = cli.exit_for(raised(ValueError("a bug")))
    assert bug[1] == "unexpected error: ValueError: a bug" and bug[2][0].startswith("Traceback"), bug


@pytest.fixture()
def inputs(tmp_path, world):
    """A job that validates, a run directory whose checkpoint is not one, and a cluster address nobody serves."""
    job = {"name": "t", "model": str(world / "init"), "method": "lora",
           "data": {"train": str(world / "data/english_train.parquet")}}
    good = tmp_path / "job.yaml"
    good.write_text(yaml.safe_dump(job))
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / "step_1").mkdir(parents=True)
    (run_dir / "job.yaml").write_text(yaml.safe_dump(job))
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"good": str(good), "missing": str(tmp_path / "missing.yaml"), "run": str(run_dir), "empty": str(empty),
            "nowhere": f"http://127.0.0.1:{free_port()}"}


# (command line, exit code, words the message has); {name} fills from the inputs fixture
CASES = [
    ("validate {missing}", 2, "job file not found"),
    ("train {missing}", 2, "job file not found"),
    ("tune {missing}", 2, "job file not found"),
    ("plan", 2, "give a job file or --model"),
    ("plan --model {empty}", 2, "cannot plan"),
    ("report {empty}", 2, "neither kind of directory"),
    ("merge {empty}", 2, "not a run directory"),
    ("merge {run} --checkpoint {empty}", 1, "export failed"),
    ("quickstart {good}", 2, "is a file"),
    ("submit {good} --address {nowhere}", 1, "127.0.0.1"),
    ("submit {missing} --address {nowhere}", 2, "job file not found"),
    ("status raysubmit_x --address {nowhere}", 1, "127.0.0.1"),
    ("status raysubmit_x --address ftp://example", 2, "ftp://example"),
    ("logs raysubmit_x --address {nowhere}", 1, "127.0.0.1"),
    ("stop raysubmit_x --address {nowhere}", 1, "127.0.0.1"),
    ("list --address {nowhere}", 1, "127.0.0.1"),
    ("cluster status --dir {empty}", 1, "empty"),
    ("cluster down --dir {empty}", 1, "empty"),
    ("schema --markdown --json", 2, "not both"),
]


def rayft(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)


def test_each_command_exits_2_on_bad_input_and_1_when_it_fails_and_says_why(inputs):
    wrong = []
    for line, code, words in CASES:
        args = [part.format(**inputs) for part in line.split()]
        proc = rayft(args)
        said = proc.stderr
        if proc.returncode != code or words not in said or "Traceback" in said:
            wrong.append(f"rayft {' '.join(args)}: exit {proc.returncode} (want {code}), stderr {said[-800:]!r}")
    assert not wrong, "\n".join(wrong)


def test_under_json_stdout_is_empty_and_the_error_is_json_on_stderr(inputs):
    """Each command that takes --json, on a failure of each kind it can have here: the same exit code as
    without --json, nothing on stdout, and {"error": ..., "problems": [...]} on stderr."""
    takes_json = {name for name, command in commands().items() if any(p.name == "as_json" for p in command.params)}
    tried, wrong = set(), []
    for line, code, words in CASES:
        args = [part.format(**inputs) for part in line.split()]
        name = " ".join(args[:2]) if args[0] == "cluster" else args[0]
        if name not in takes_json:
            continue
        tried.add(name)
        proc = rayft([*args, "--json"])
        try:
            error = json.loads(proc.stderr[proc.stderr.index("{"):]) if "{" in proc.stderr else None
        except json.JSONDecodeError:
            error = None
        if proc.returncode != code or proc.stdout.strip() or not error or set(error) != {"error", "problems"} or words not in json.dumps(error):
            wrong.append(f"rayft {' '.join(args)} --json: exit {proc.returncode} (want {code}), stdout {proc.stdout[-300:]!r}, stderr {proc.stderr[-600:]!r}")
    assert not wrong, "\n".join(wrong)
    assert tried == takes_json, f"commands with --json and no failure case here: {takes_json - tried}"


def test_a_config_error_under_json_lists_every_problem(tmp_path, world):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "t", "model": str(world / "init"), "method": "lora",
                                   "data": {"train": str(world / "data/english_train.parquet")},
                                   "train": {"epochs": 0}, "quantization": {"type": "int3"}}))
    result = CliRunner().invoke(cli.main, ["validate", str(bad), "--no-data", "--json"])
    assert result.exit_code == 2 and not result.stdout.strip(), result.output
    error = json.loads(result.stderr)
    assert error["error"] == "2 problem(s) in the job:", error
    assert any(p.startswith("train.epochs") for p in error["problems"]) and any(p.startswith("quantization.type") for p in error["problems"]), error
