"""Which torch build `make setup` installs: prints pip's arguments on stdout and the choice on stderr.

Without an NVIDIA driver: the pinned version from the configured index (on these machines the local CPU
wheel). With one: the pinned version's CUDA build from PyTorch's index for the newest CUDA the driver
supports (nvidia-smi's "CUDA Version"), so that a GPU host never gets a CPU-only or too-new build.
TORCH_INDEX_URL overrides the choice. Standard library only: it runs before the venv exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

# PyTorch's CUDA builds of the pinned version, newest first: (CUDA major, minor, index suffix)
CUDA_BUILDS = ((13, 0, "cu130"), (12, 8, "cu128"), (12, 6, "cu126"))
INDEX = "https://download.pytorch.org/whl/{}"


def choose(version: str, nvidia_smi: str | None, override: str | None = None) -> tuple[list[str], str]:
    """(pip arguments, what was chosen and why) for torch==version; nvidia_smi: its output, None without a driver."""
    spec = f"torch=={version}"
    if override:
        return [spec, "--index-url", override], f"torch {version} from TORCH_INDEX_URL={override}"
    if nvidia_smi is None:
        return [spec], f"torch {version}, CPU build (no NVIDIA driver: nvidia-smi not found)"
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", nvidia_smi)
    if not m:
        return [spec], f"torch {version} from the default index (nvidia-smi names no CUDA version)"
    driver = (int(m.group(1)), int(m.group(2)))
    for major, minor, tag in CUDA_BUILDS:
        if (major, minor) <= driver:
            return [spec, "--index-url", INDEX.format(tag)], f"torch {version}+{tag} (the driver supports CUDA {driver[0]}.{driver[1]})"
    oldest = CUDA_BUILDS[-1]
    return [spec], f"torch {version} from the default index: the driver's CUDA {driver[0]}.{driver[1]} is older than torch's oldest build ({oldest[0]}.{oldest[1]}); update the driver"


def main() -> None:
    smi = shutil.which("nvidia-smi")
    out = None
    if smi:
        try:
            out = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
    args, said = choose(sys.argv[1], out, os.environ.get("TORCH_INDEX_URL"))
    print(f"set-up: {said}", file=sys.stderr)
    print(" ".join(args))


if __name__ == "__main__":
    main()
