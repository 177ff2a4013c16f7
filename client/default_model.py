"""The embedded default: a tiny model repository in the local cache, served by a local Triton server.

Building it needs the server extra (torch, diffusers, onnx); the client only runs `rf-export tiny` as a
child process, so it never imports them itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from realfake.core.errors import UserError


def home() -> Path:
    return Path(os.environ.get("RF_HOME") or Path.home() / ".cache" / "realfake")


def default_repo() -> Path:
    return home() / "tiny" / "repo"


def ensure_default_repo(log=print) -> Path:
    """The default repository, built on first use (a tiny random-weight bundle -> ONNX -> repository)."""
    repo = default_repo()
    if (repo / "pipeline" / "config.pbtxt").is_file():
        return repo
    log(f"building the embedded default model (tiny bundle -> ONNX -> Triton repository) in {repo.parent}")
    cmd = [sys.executable, "-m", "realfake.export.cli", "tiny", "--out", str(repo.parent)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"could not build the embedded default model: {tail[0]}")
    return repo
