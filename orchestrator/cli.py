"""`rayft`: each command parses, calls one function, prints. Every failure leaves through one map, exit_for():
0 ok, 1 the run failed, 2 bad input, 130 / 143 interrupted (Ctrl-C / SIGTERM). Under --json, stdout holds
only the JSON result, and an error is JSON on stderr: {"error": ..., "problems": [...]}."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from orchestrator.config import ConfigError, JobConfig, build_job, gpu_present, load_job, load_raw, to_yaml

SET_HELP = "Override a job key: --set train.lr=1e-4 (repeatable; values parse as YAML)."
OK, FAILED, BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    """What the user gave cannot run (exit 2); problems: each one, when there are several."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or []


def _loaded(module: str, name: str) -> type | None:
    """An exception class, if its module has been imported: an exception of a module that was never
    imported cannot have been raised, and importing one (torch's, for jobs.merge) would slow every error."""
    found = getattr(sys.modules.get(module), name, None)
    return found if isinstance(found, type) else None


def _isinstance(e: BaseException, *where: tuple[str, str]) -> bool:
    return any(cls is not None and isinstance(e, cls) for cls in (_loaded(m, n) for m, n in where))


def exit_for(e: BaseException) -> tuple[int, str, list[str]]:
    """The one map from what went wrong to (exit code, message, problems)."""
    if isinstance(e, ConfigError):
        problems = [f"{p.path}: {p.message}" + (f"\n    fix: {p.fix}" if p.fix else "") for p in e.problems]
        return BAD_INPUT, f"{len(problems)} problem(s) in the job:", problems
    if _isinstance(e, ("jobs.rowstore", "DataError")):
        problems = list(getattr(e, "problems", [str(e)]))
        return BAD_INPUT, f"{len(problems)} problem(s) found before training (nothing was trained):", problems
    if _isinstance(e, ("orchestrator.planner", "DoesNotFit")):
        return BAD_INPUT, f"{e}\n(--no-fit-check launches it anyway)", []
    if _isinstance(e, ("orchestrator.hub", "HubError")):  # a hub model read after validation (rayft plan --model org/name)
        return BAD_INPUT, "1 problem(s) with the model:", [f"{getattr(e, 'key', 'model')}: {e}\n    fix: {getattr(e, 'fix', '')}"]
    if _isinstance(e, ("orchestrator.planner", "PlanError")):
        return BAD_INPUT, f"cannot plan: {e}", []
    if isinstance(e, BadInput):
        return BAD_INPUT, str(e), e.problems
    if _isinstance(e, ("orchestrator.launch", "Interrupted")):
        return int(getattr(e, "exit_code", 130)), str(e), []
    if isinstance(e, KeyboardInterrupt):
        return 130, "stopped by SIGINT (Ctrl-C)", []
    if _isinstance(e, ("orchestrator.launch", "RunFailed"), ("orchestrator.remote", "RemoteError"), ("orchestrator.cluster", "ClusterError")):
        return FAILED, str(e), []
    if isinstance(e, OSError):  # a file that cannot be read or written, a port that is taken
        return FAILED, f"{type(e).__name__}: {e}", []
    return FAILED, f"unexpected error: {type(e).__name__}: {e}", ["".join(traceback.format_exception(e))]


MAX_LISTED = 50


def _exit(e: BaseException, as_json: bool) -> None:
    code, message, problems = exit_for(e)
    if as_json:
        click.echo(json.dumps({"error": message, "problems": problems}, indent=2), err=True)
    else:
        lines = [message] + [p if p.startswith("Traceback") else "  ✗ " + p.replace("\n", "\n  ") for p in problems[:MAX_LISTED]]
        if len(problems) > MAX_LISTED:
            lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
        click.echo("\n".join(lines), err=True)
    sys.exit(code)


F = TypeVar("F", bound=Callable[..., Any])


def handled(f: F) -> F:
    """Every command's one exit path: an exception it raises becomes its exit code and message (exit_for),
    as JSON on stderr when the command was given --json."""

    @functools.wraps(f)
    def command(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except (SystemExit, click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except BaseException as e:  # KeyboardInterrupt included: it is exit 130, not a traceback
            _exit(e, bool(kwargs.get("as_json")))

    command.handled = True  # type: ignore[attr-defined]  (tests/test_exit_codes.py checks every command has it)
    return command  # type: ignore[return-value]


def run() -> None:
    """The `rayft` console script: main(), with click's own usage errors (exit 2) as JSON under --json."""
    try:
        code = main(standalone_mode=False)
    except click.ClickException as e:
        if "--json" in sys.argv[1:]:
            click.echo(json.dumps({"error": e.format_message(), "problems": []}, indent=2), err=True)
        else:
            e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("stopped by SIGINT (Ctrl-C)", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else OK)


def _load(job_file: str, sets: tuple[str, ...]) -> JobConfig:
    job, warnings = load_job(job_file, sets)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    return job


def _size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    from orchestrator.config import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _fit_check(job: JobConfig, memory_limit: int | None) -> None:
    """Refuse (exit 2) a job the memory planner predicts will not fit, naming the cheapest change that would."""
    from orchestrator import planner

    verdict = planner.check(job, planner.budget_for(job, memory_limit))
    if not verdict.fits:
        raise BadInput(f"the job is predicted not to fit: {verdict.message}\n(--no-fit-check launches it anyway)")
    if verdict.message:
        click.echo(f"warning: {verdict.message}", err=True)


FIT_HELP = "Launch even when the memory planner predicts the job will not fit."
LIMIT_HELP = "Memory per worker for the fit check (e.g. 24GiB); default: the GPU's memory, or host MemAvailable / workers."


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def _progress(as_json: bool) -> Any:
    """Where a command's progress lines go: the terminal's stdout, or stderr when stdout is the --json result."""
    return sys.stderr if as_json else sys.stdout


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rayft")
def main() -> None:
    """Fine-tune vision-language models (and text LLMs) on Ray: full (DeepSpeed ZeRO), LoRA, QLoRA."""
    quiet_environment()


def quiet_environment() -> None:
    """Defaults that keep third-party noise out of the user's terminal (and out of --json output)."""
    if not gpu_present():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # else DeepSpeed warns on stdout that it fell back to CPU
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the resolved config as JSON.")
@click.option("--no-data", is_flag=True, help="Check the job file only: skip the model and data checks (no Ray start).")
@handled
def validate(job_file: str, sets: tuple[str, ...], as_json: bool, no_data: bool) -> None:
    """Print the resolved job config, or every problem at once (exit 2).

    Unless --no-data, also runs the checks `rayft train` runs before training: the model's processor and
    chat template load and render, and every row of the data (columns, images, conversation, length with
    image tokens against data.max_length) passes, on an embedded Ray (a later run reuses the result)."""
    job = _load(job_file, sets)
    if not no_data:
        from orchestrator import launch

        summary = launch.validate_data(job)
        for which, s in summary.items():
            dropped = f", {s['dropped']} longer than data.max_length dropped" if s["dropped"] else ""
            images = f"; {s['images']}" if s.get("images") else ""
            click.echo(f"data.{which}: {s['rows']} rows ok, longest {s['longest']} tokens (data.max_length {job.data.max_length}){dropped}{images}", err=True)
    if as_json:
        _print_json(job.model_dump(mode="json"))
    else:
        click.echo(to_yaml(job), nl=False)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), help="Continue RUN_DIR from its last checkpoint.")
@click.option("--no-progress", is_flag=True, help="No live progress display.")
@click.option("--no-fit-check", is_flag=True, help=FIT_HELP)
@click.option("--memory-limit", metavar="SIZE", callback=_size_option, help=LIMIT_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON at the end (progress goes to stderr).")
@handled
def train(
    job_file: str, sets: tuple[str, ...], resume: Path | None, no_progress: bool, no_fit_check: bool, memory_limit: int | None, as_json: bool
) -> None:
    """Run one fine-tuning job; prints the run directory and the merged model's path."""
    from orchestrator import launch

    job = _load(job_file, sets)
    if not no_fit_check:
        _fit_check(job, memory_limit)
    outcome = launch.train(job, resume=resume, stream=_progress(as_json), progress=not no_progress, started=launch.process_started(), job_file=job_file)
    written = {"report": str(outcome.report[1]), "report_png": str(outcome.report[0])} if outcome.report else {}
    if as_json:
        _print_json({**outcome.manifest, **written})
        return
    m = outcome.manifest["metrics"]
    click.echo(f"run directory: {outcome.run_dir}")
    if m.get("eval_accuracy") is not None:
        click.echo(launch.accuracy_line(m))
    click.echo(f"merged model:  {outcome.model_dir}")
    if written:
        click.echo(f"report: {written['report']}")


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--resume", type=click.Path(file_okay=False, exists=True, path_type=Path), help="Continue an interrupted search.")
@click.option("--no-fit-check", is_flag=True, help=FIT_HELP + " (Otherwise trials predicted not to fit are skipped.)")
@click.option("--memory-limit", metavar="SIZE", callback=_size_option, help=LIMIT_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the search's summary as JSON at the end (progress goes to stderr).")
@handled
def tune(job_file: str, sets: tuple[str, ...], resume: Path | None, no_fit_check: bool, memory_limit: int | None, as_json: bool) -> None:
    """Ray Tune search over the job's tune: space; exports the best trial's merged model."""
    from orchestrator import search
    from orchestrator.config import load_search

    job, base, warnings = load_search(job_file, sets)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    summary = search.run(job, base, resume=resume, stream=_progress(as_json), fit_check=not no_fit_check, memory_limit=memory_limit, job_file=job_file)
    if as_json:
        _print_json({k: v for k, v in summary.items() if k != "best_manifest"})
        return
    search_dir = Path(summary["search_dir"])
    click.echo((search_dir / "results.md").read_text())
    best = summary["best"]
    click.echo(f"best trial: {best['trial']} {summary['metric']}={best['best_metric']:.4f} at step {best['best_step']} {best['overrides']}")
    click.echo(f"best model: {summary['best_model']}")
    click.echo(f"plot: {search_dir / 'metrics.png'}")
    click.echo(f"frontier: {search_dir / 'frontier.png'} (table: {search_dir / 'frontier.md'})")
    if "budget" in summary:
        click.echo(search.budget_line(summary["budget"]))
    click.echo(f"wall time: {summary['wall_s']}s")


@main.command()
@click.argument("job_file", required=False, type=click.Path(dir_okay=False))
@click.option("--model", metavar="DIR_OR_SIZE", help="Plan a model directory or a nominal size (7B) with the schema's defaults, instead of a job.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--gpu-mem", metavar="SIZE", callback=_size_option, help="Plan for GPUs of this memory (e.g. 24GiB); default: nvidia-smi's, or host memory per CPU worker.")
@click.option("--gpus", type=click.IntRange(min=1), help="Workers for the ZeRO-3 alternatives (default: the job's scaling.workers).")
@click.option("--units", type=click.Choice(["GiB", "GB", "MiB"]), default="GiB", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@handled
def plan(
    job_file: str | None, model: str | None, sets: tuple[str, ...], gpu_mem: int | None, gpus: int | None, units: str, as_json: bool
) -> None:
    """Predicted memory per GPU (or CPU worker) for a job and its alternatives; recommends what fits."""
    from orchestrator import planner

    if (job_file is None) == (model is None):
        raise BadInput("give a job file or --model DIR_OR_SIZE (not both)")
    if job_file:
        job, _ = load_job(job_file, sets, local_files=False)
    else:
        job, _ = build_job({"model": model, "data": {"train": "(none).jsonl"}}, sets, local_files=False)
    shape = planner.load_shape(job.model_dir)
    budget = planner.Budget("gpu", gpu_mem, "--gpu-mem", per_worker=True) if gpu_mem else planner.budget_for(job)
    if budget.device == "cpu" and not gpu_mem:
        click.echo("no GPU found: planning per CPU worker (--gpu-mem 24GiB plans for a GPU)", err=True)
    comparison = planner.compare(job, shape, budget, gpus)
    if as_json:
        rec = comparison.recommended
        _print_json({"model": shape.name, "total_params": shape.total_params, "device": budget.device,
                     "available": budget.for_workers(job.scaling.workers), "rows": [p.as_dict() for p in comparison.rows],
                     "recommended": rec.as_dict() if rec else None})
        return
    click.echo(planner.render(comparison, units))


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the written files' paths (and a run's attempts) as JSON.")
@handled
def report(directory: Path, as_json: bool) -> None:
    """Regenerate the report of a search directory (results.csv, results.md, metrics.png: every trial's
    metric by step; frontier.png and frontier.md: each trial's best metric against its predicted memory per
    worker, with the Pareto frontier) or of a run directory (report.md: config, metrics, parity, timings,
    attempts, sample generations; report.png: a panel per metric by step, one colour per attempt). Prints a
    search's results table, or a run's attempts, and the written files' paths."""
    from orchestrator import run_report, search

    if (directory / "tune.yaml").is_file():
        written = search.report(directory)
        files = {k: str(v) for k, v in written.files.items()}
        if as_json:
            _print_json(files)
            return
        click.echo(written.results_md)
        click.echo(f"plot: {files['plot']}")
        click.echo(f"frontier: {files['frontier']}")
        click.echo(f"frontier table: {files['frontier_md']}")
    elif run_report.is_run_dir(directory):
        png, md = run_report.write_run_report(directory)
        attempts = run_report.attempt_table(directory)
        if as_json:
            _print_json({"report": str(md), "report_png": str(png), "attempts": attempts})
            return
        click.echo(run_report.render_table(attempts))
        click.echo(f"report: {md}")
        click.echo(f"plot: {png}")
    else:
        what = "not a directory" if not directory.is_dir() else "neither kind of directory"
        raise BadInput(f"{directory}: {what}; rayft report takes a search directory (with tune.yaml, from rayft tune) "
                       "or a run directory (with job.yaml and metrics.jsonl, from rayft train)")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--checkpoint", type=click.Path(file_okay=False, exists=True, path_type=Path), help="Default: the newest.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override the run's job.yaml, e.g. export.parity_memory=0.")
@click.option("--json", "as_json", is_flag=True)
@handled
def merge(run_dir: Path, checkpoint: Path | None, sets: tuple[str, ...], as_json: bool) -> None:
    """(Re)export RUN_DIR's checkpoint as a merged standalone model under RUN_DIR/model."""
    import contextlib

    from orchestrator import launch

    if not (run_dir / "job.yaml").is_file():
        raise BadInput(f"{run_dir}: not a run directory (no job.yaml); rayft merge takes a directory that rayft train wrote")
    job, _ = build_job(load_raw(run_dir / "job.yaml"), sets)
    checkpoint = checkpoint or launch.latest_checkpoint(run_dir)
    if checkpoint is None:
        raise BadInput(f"{run_dir}: no checkpoint found under {run_dir / 'checkpoints'}")
    with contextlib.redirect_stdout(sys.stderr):  # libraries' progress prints (DeepSpeed's) stay off stdout
        outcome = launch.export_run(job, run_dir.resolve(), checkpoint.resolve())
    if as_json:
        _print_json(outcome.manifest)
        return
    from jobs.merge import describe

    parity = outcome.manifest["parity"]
    click.echo(f"merged model: {outcome.model_dir} ({parity['merge']} export, {parity['export_dtype']}, {parity['export_s']:.1f} s)")
    for check in parity["checks"].values():
        click.echo(f"parity check {describe(check)}")


@main.command()
@click.argument("directory", default="./quickstart", type=click.Path(file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the demo's summary as JSON at the end (progress goes to stderr).")
@handled
def quickstart(directory: Path, as_json: bool) -> None:
    """Offline demo: tiny VLM + colour data -> full fine-tune -> QLoRA to a new task -> merged model."""
    from orchestrator import quickstart as qs

    summary = qs.run(directory, _progress(as_json))
    if as_json:
        _print_json(summary)
        return
    s = summary["sample"]
    click.echo("")
    click.echo(f"base (full fine-tune, English answers): held-out accuracy {summary['base_accuracy_english']:.1%}")
    click.echo(f"QLoRA to French answers: held-out accuracy {summary['before_accuracy_french']:.1%} -> {summary['after_accuracy_french']:.1%}")
    click.echo(f"merged model: {summary['merged_model']}")
    click.echo(f"sample: {s['question']!r} -> {s['merged_model_answer']!r} (expected {s['expected']!r})")
    click.echo(f"wall time: {summary['wall_s']}s")


# ----------------------------------------------------------------------------------------------------
# Ray clusters: a local one for development, and any cluster's Jobs API

CLUSTER_DIR_HELP = "Cluster directory (token, state, logs); default ~/.rayft/cluster."


@main.group()
def cluster() -> None:
    """A Ray cluster on this machine (loopback, token auth) for trying `rayft submit`."""


@cluster.command("up")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), help=CLUSTER_DIR_HELP)
@click.option("--nodes", default=1, show_default=True, help="Ray nodes: a head plus nodes-1 workers, all on 127.0.0.1.")
@click.option("--cpus-per-node", type=int, help="Default: this machine's cores split among the nodes.")
@click.option("--port", default=6379, show_default=True, help="GCS port.")
@click.option("--dashboard-port", default=8265, show_default=True, help="Dashboard / Jobs API port.")
@click.option("--timeout", "timeout_s", default=300, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds to wait until every node is up. 2 nodes take ~10 s on an idle 2-core machine and have taken ~160 s on a busy one.")
@handled
def cluster_up(directory: Path | None, nodes: int, cpus_per_node: int | None, port: int, dashboard_port: int, timeout_s: float) -> None:
    """Start the cluster; prints the address to submit to and where the token is (never the token).
    If a node is not up in time, stops everything it started and prints that node's log."""
    from orchestrator import cluster as local

    directory = directory or local.default_dir()
    state = local.up(directory, nodes=nodes, cpus_per_node=cpus_per_node, port=port, dashboard_port=dashboard_port, timeout_s=timeout_s)
    click.echo(f"Ray cluster up in {state['up_s']}s: {nodes} node(s) on 127.0.0.1")
    click.echo(f"address: {state['dashboard']}   (export RAY_ADDRESS={state['dashboard']})")
    click.echo(f"token:   {state['token_path']} (mode 0600; export RAY_AUTH_TOKEN_PATH={state['token_path']})")
    click.echo(f"stop it: rayft cluster down --dir {directory}")


@cluster.command("status")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), help=CLUSTER_DIR_HELP)
@click.option("--json", "as_json", is_flag=True)
@handled
def cluster_status(directory: Path | None, as_json: bool) -> None:
    """Nodes and resources of the local cluster."""
    from orchestrator import cluster as local

    state = local.status(directory or local.default_dir())
    if as_json:
        _print_json(state)
        return
    click.echo(f"address: {state['dashboard']}  nodes: {len(state['nodes'])}")
    for n in state["nodes"]:
        res = n.get("resources_total", {})
        role = "head" if n.get("is_head_node") else "worker"
        click.echo(f"  {n['node_id'][:12]} {role:6} {n['state']:5} {n['node_ip']}  CPU {res.get('CPU', 0):g}  GPU {res.get('GPU', 0):g}  memory {res.get('memory', 0) / 2**30:.1f} GiB")


@cluster.command("down")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), help=CLUSTER_DIR_HELP)
@handled
def cluster_down(directory: Path | None) -> None:
    """Stop exactly the processes `cluster up` started (SIGTERM, then SIGKILL after 15 s); returns once all have exited."""
    from orchestrator import cluster as local

    out = local.down(directory or local.default_dir())
    click.echo(f"stopped {out['nodes']} Ray node(s) in {out['down_s']}s; all {out['processes']} processes exited ({out['killed']} needed SIGKILL)")


def _connection(address: str | None, insecure: bool):  # -> (address, token)
    """The Jobs API address and token; a missing or unsafe one is bad input (exit 2), not a failed run."""
    from orchestrator import cluster, remote

    try:
        address = remote.resolve_address(address)
        token = remote.resolve_token(address, cluster.token_for(address))
        for w in remote.check_transport(address, token, insecure):
            click.echo(f"warning: {w}", err=True)
    except remote.RemoteError as e:
        raise BadInput(str(e)) from None
    return address, token


def _address_options(f: Any) -> Any:
    f = click.option("--insecure", is_flag=True, help="Allow plain http to a non-loopback address without a token.")(f)
    return click.option("--address", help="The cluster's Jobs API, e.g. http://HOST:8265 (default: $RAY_ADDRESS).")(f)


@main.command()
@click.argument("job_file", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@_address_options
@click.option("--runtime-env", "runtime_env_file", type=click.Path(dir_okay=False, exists=True), help="A runtime_env YAML merged into the job's (e.g. cluster/runtime_env.yaml).")
@click.option("--wait/--no-wait", default=True, show_default=True, help="Wait until the job has checked its inputs on the cluster.")
@click.option("--json", "as_json", is_flag=True)
@handled
def submit(job_file: str, sets: tuple[str, ...], address: str | None, insecure: bool, runtime_env_file: str | None, wait: bool, as_json: bool) -> None:
    """Validate JOB_FILE here, submit it to a Ray cluster's Jobs API, print the job id."""
    import yaml

    from orchestrator import remote

    address, token = _connection(address, insecure)
    job, warnings = load_job(job_file, sets, local_files=remote.is_loopback(address), cluster=True)
    for w in warnings:
        click.echo(f"warning: {w}", err=True)
    runtime_env = yaml.safe_load(Path(runtime_env_file).read_text()) if runtime_env_file else None
    t0 = time.time()
    out = remote.submit(job, address, token, runtime_env)
    out["submit_s"] = round(time.time() - t0, 2)
    if not as_json:
        click.echo(f"submitted: {out['job_id']}  (results: {out['results']})")
    if wait:
        out["submit_to_running_s"] = round(out["submit_s"] + remote.wait_until_running(address, token, out["job_id"], timeout_s=300), 2)
    if as_json:
        _print_json(out)
        return
    if wait:
        click.echo(f"running: inputs checked on the cluster {out['submit_to_running_s']}s after submit")
    click.echo(f"follow it: rayft logs {out['job_id']} --follow   stop it: rayft stop {out['job_id']}")


@main.command()
@click.argument("job_id")
@_address_options
@click.option("--json", "as_json", is_flag=True)
@handled
def status(job_id: str, address: str | None, insecure: bool, as_json: bool) -> None:
    """A submitted job's status and where its results are."""
    from orchestrator import remote

    address, token = _connection(address, insecure)
    row = remote.info(address, token, job_id)
    if as_json:
        _print_json(row)
        return
    click.echo(f"{row['job_id']}: {row['status']}" + (f" ({row['message']})" if row["message"] else ""))
    if row["results"]:
        click.echo(f"results: {row['results']}" + (f"  (merged model: {row['results']}/model)" if row["status"] == "SUCCEEDED" else ""))


@main.command()
@click.argument("job_id")
@_address_options
@click.option("--follow", "-f", is_flag=True, help="Stream until the job ends.")
@handled
def logs(job_id: str, address: str | None, insecure: bool, follow: bool) -> None:
    """A submitted job's output (progress, eval lines, errors)."""
    from orchestrator import remote

    address, token = _connection(address, insecure)
    remote.logs(address, token, job_id, follow, sys.stdout)


@main.command()
@click.argument("job_id")
@_address_options
@handled
def stop(job_id: str, address: str | None, insecure: bool) -> None:
    """Stop a submitted job and wait until it has stopped."""
    from orchestrator import remote

    address, token = _connection(address, insecure)
    final = remote.stop(address, token, job_id)
    click.echo(f"{job_id}: {final}")


@main.command("list")
@_address_options
@click.option("--json", "as_json", is_flag=True)
@handled
def list_(address: str | None, insecure: bool, as_json: bool) -> None:
    """Jobs on the cluster, newest first."""
    from orchestrator import remote

    address, token = _connection(address, insecure)
    rows = sorted(remote.list_jobs(address, token), key=lambda r: r["start"] or 0, reverse=True)
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        click.echo(f"{r['job_id']:48} {r['status']:10} {r['name'] or '-':20} {r['results'] or ''}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="JSON Schema of a job file, for editors (the default).")
@click.option("--markdown", "as_markdown", is_flag=True, help="The job-file reference, as in docs/job-reference.md.")
@handled
def schema(as_json: bool, as_markdown: bool) -> None:
    """The job file's schema: every key, its type, default, allowed values and doc.

    \b
    rayft schema --json > job.schema.json            # JSON Schema (yaml-language-server, VS Code); the default
    rayft schema --markdown > docs/job-reference.md  # regenerate the reference
    """
    from orchestrator import schema_doc

    if as_json and as_markdown:
        raise BadInput("give --json or --markdown, not both")
    if as_markdown:
        click.echo(schema_doc.markdown(), nl=False)
    else:
        _print_json(schema_doc.json_schema())


if __name__ == "__main__":  # python -m orchestrator.cli, as the console script
    run()
