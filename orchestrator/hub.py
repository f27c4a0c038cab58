"""Models named by their Hugging Face hub id (`model: Qwen/Qwen2-VL-2B-Instruct`), read through the hub client's
own cache (HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, HF_ENDPOINT, HF_TOKEN): never hand-built paths or URLs.

At the edge (orchestrator.config.load_job) a hub id's `model_revision` (a branch, tag or commit; default main) is
resolved to its commit, and the job carries that commit from then on: the driver, every Ray worker and data task,
the planner and the export each ask `local_dir` for the snapshot of that one commit, on their own node (downloaded
once per node into its cache, or read from shared storage when HF_HOME points at one). So two nodes cannot train
on two revisions. A local directory (or a size such as `7B` for the planner) passes through unchanged.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")
WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin")  # a snapshot with weights, not a partial download's configs


class HubError(Exception):
    """A hub model that cannot be had: the message names the model and revision, `fix` says what to do."""

    def __init__(self, message: str, fix: str, key: str = "model"):
        super().__init__(message)
        self.fix, self.key = fix, key


def is_hub_id(model: str) -> bool:
    """`org/name` that is not a path on this machine."""
    return bool(HUB_ID.match(model)) and not model.startswith(".") and not Path(model).exists()


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() not in ("", "0", "false", "no", "off")


def resolve(model: str, revision: str | None) -> str:
    """The commit `revision` (default main) of hub model `model` names, with its files in this node's cache."""
    return Path(snapshot(model, revision)).name


def local_dir(model: str, revision: str | None) -> str:
    """Where `model`'s files are on this node: the snapshot of `revision` for a hub id, `model` itself otherwise."""
    if not is_hub_id(model):
        return model
    return snapshot(model, revision)


@lru_cache(maxsize=16)
def snapshot(model: str, revision: str | None) -> str:
    """The cache's snapshot directory of `model` at `revision`: from the cache when it is there (a commit is
    never looked up again), else downloaded once into it. Errors as HubError, naming the option and the fix."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    what = f"{model}" + (f" at model_revision {revision}" if revision else "")
    if revision and COMMIT.match(revision):
        try:  # a commit's files never change: a complete snapshot in the cache answers without asking the hub
            found = snapshot_download(model, revision=revision, local_files_only=True)
            if any(any(Path(found).glob(pattern)) for pattern in WEIGHTS):
                return found
        except LocalEntryNotFoundError:
            pass
    try:
        return snapshot_download(model, revision=revision)
    except GatedRepoError:
        raise HubError(f"{what}: the model is gated and this machine's token has no access to it",
                       "accept its terms on the hub, then set HF_TOKEN (or run `hf auth login`)") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: the hub has no such revision", "set model_revision to a branch, tag or commit of the model", "model_revision") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: no such model on {endpoint()}, or it is private and this machine has no token for it",
                       "check the id, or set HF_TOKEN for a private model") from None
    except LocalEntryNotFoundError as e:
        if offline():
            raise HubError(f"{what}: not in the Hugging Face cache ({cache_dir()}) and HF_HUB_OFFLINE is set",
                           f"download it once where the hub is reachable (`hf download {model}`), or unset HF_HUB_OFFLINE") from None
        raise HubError(f"{what}: not in the Hugging Face cache ({cache_dir()}) and the hub at {endpoint()} cannot be reached ({_first_line(e)})",
                       "check the network or HF_ENDPOINT, or point model at a local directory") from None


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _first_line(error: BaseException) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    return lines[0].removeprefix("Got: ") if lines else type(error).__name__
