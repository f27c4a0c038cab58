"""Models named by hub id (`model: org/name`), read through a real Hugging Face cache in the hub client's own
layout (conftest.cache_hub_model), offline. The training, export and `rayft merge` of a hub model are
tests/test_train.py::test_adapters_learn_and_export[lora-none]."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import HUB_COMMIT, RAYFT, cache_hub_model


@pytest.fixture(scope="module")
def hub_job(world, tmp_path_factory) -> Path:
    """A job naming the quickstart's untrained VLM as hub model acme/tiny-vlm, which is in the cache."""
    cache_hub_model("acme/tiny-vlm", world / "init")
    from orchestrator.config import load_raw

    body = load_raw(world / "jobs" / "base.yaml")  # its data paths made absolute
    body["model"] = "acme/tiny-vlm"
    path = tmp_path_factory.mktemp("hub") / "job.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def rayft(*args: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_ENDPOINT", "HF_TOKEN")}
    return subprocess.run([RAYFT, *args], capture_output=True, text=True, timeout=120, env={**full, **env})


def closed_port() -> int:
    """A loopback port nothing listens on: a hub that cannot be reached, without leaving this machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cached_hub_id_validates_and_plans_offline_and_resolves_to_its_commit(hub_job):
    """Before: `not a local directory: acme/tiny-vlm` (exit 2) offline, and a bare FileNotFoundError at train."""
    checked = rayft("validate", str(hub_job), "--no-data", "--json", HF_HUB_OFFLINE="1")
    assert checked.returncode == 0, checked.stderr
    resolved = yaml.safe_load(checked.stdout)
    assert resolved["model"] == "acme/tiny-vlm" and resolved["model_revision"] == HUB_COMMIT  # main, resolved to its commit
    planned = rayft("plan", str(hub_job), HF_HUB_OFFLINE="1")
    assert planned.returncode == 0, planned.stderr
    assert "model: acme/tiny-vlm at main (llava" in planned.stdout and "parameters" in planned.stdout
    # online, with a hub that does not answer: the cache still serves a model it holds
    online = rayft("validate", str(hub_job), "--no-data", HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert online.returncode == 0, online.stderr


def test_a_hub_model_that_cannot_be_had_is_refused_before_launch_naming_the_key_and_the_fix(hub_job, tmp_path):
    def job_with(**keys: str) -> str:
        body = {**yaml.safe_load(hub_job.read_text()), **keys}
        path = tmp_path / f"job-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(body))
        return str(path)

    absent = rayft("validate", job_with(model="acme/absent"), "--no-data", HF_HUB_OFFLINE="1")
    assert absent.returncode == 2
    assert "model: acme/absent: not in the Hugging Face cache" in absent.stderr and "HF_HUB_OFFLINE is set" in absent.stderr
    assert "hf download acme/absent" in absent.stderr

    planned = rayft("plan", "--model", "acme/absent", HF_HUB_OFFLINE="1")  # read after validation: the same problem, not a traceback
    assert planned.returncode == 2 and "model: acme/absent: not in the Hugging Face cache" in planned.stderr and "Traceback" not in planned.stderr

    revision = rayft("validate", job_with(model_revision="v9"), "--no-data", HF_HUB_OFFLINE="1")
    assert revision.returncode == 2 and "acme/tiny-vlm at model_revision v9: not in the Hugging Face cache" in revision.stderr

    endpoint = f"http://127.0.0.1:{closed_port()}"
    token = "hf_" + "x" * 34  # a token in the environment is never printed
    unreachable = rayft("validate", job_with(model="acme/absent"), "--no-data", HF_ENDPOINT=endpoint, HF_TOKEN=token)
    assert unreachable.returncode == 2, unreachable.stderr
    assert f"the hub at {endpoint} cannot be reached" in unreachable.stderr and "fix: check the network or HF_ENDPOINT" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr and token not in unreachable.stderr + unreachable.stdout


def test_submit_refuses_to_carry_the_hub_token(hub_job):
    """HF_TOKEN is a secret like the trackers': it belongs in the cluster's own environment, never in a submission."""
    from orchestrator import remote
    from orchestrator.config import load_job

    job, _ = load_job(hub_job, ["submit.ship=[]"], local_files=False)
    with pytest.raises(remote.RemoteError, match="HF_TOKEN.*cluster's own environment"):
        remote.submit(job, "http://127.0.0.1:1", None, {"env_vars": {"HF_TOKEN": "hf_" + "y" * 34}})


def test_a_search_pins_the_commit_its_trials_train(hub_job, tmp_path):
    """Trials start from the job as written: a hub id without a commit would be resolved again by each trial
    (main may move mid-search); the search's base carries the commit validation resolved."""
    from orchestrator.config import load_search

    body = {**yaml.safe_load(hub_job.read_text()), "tune": {"space": {"train.lr": {"choice": [0.001, 0.002]}}}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(body))
    job, base, _ = load_search(path)
    assert job.model_revision == base["model_revision"] == HUB_COMMIT and base["model"] == "acme/tiny-vlm"

