"""The embedded default: a tiny model repository in the local cache, served by a local Triton server when a
command is given no server.

Building it needs the server extra (torch, diffusers, onnx); the client only runs `rf-export tiny` as a
child process, so it never imports them itself.
"""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def serving_urls(urls: list[str], log=print):
    """The given servers (normalised HOST:PORT), or with none the embedded default: a local Triton on the tiny
    model for as long as the block runs."""
    from realfake.client.server import LocalServer
    from realfake.client.triton import normalise_url

    if urls:
        yield [normalise_url(u) for u in urls]
        return
    repo = ensure_default_repo(log)
    log(f"starting a local Triton server on {repo}")
    with LocalServer(repo) as server:
        log(f"server ready at {server.url} (log: {server.log_path})")
        yield [server.url]
