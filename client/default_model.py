"""Models served on this machine when a command uses no running server: `tiny` (a random-weight tiny model for
trying things out, built on first use), a Triton model repository, or a diffusers bundle (exported to a cached
repository first). Each runs on a local Triton server for as long as the command needs it.

Building and exporting need the server extra (torch, diffusers, onnx); the client only runs `rf-export` as a
child process, so it never imports them itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import subprocess
import sys
from pathlib import Path

from realfake.core.errors import UserError
from realfake.core.files import rf_home

TINY = "tiny"


def home() -> Path:
    return rf_home()


def default_repo() -> Path:
    return home() / "tiny" / "repo"


def _export(args: list[str], what: str) -> None:
    result = subprocess.run([sys.executable, "-m", "realfake.export.cli", *args], capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"could not build {what}: {tail[0]}")


def ensure_default_repo(log=print) -> Path:
    """The tiny model's repository, built on first use (a tiny random-weight bundle -> ONNX -> repository)."""
    repo = default_repo()
    if (repo / "pipeline" / "config.pbtxt").is_file():
        return repo
    log(f"building the tiny model (random weights: tiny bundle -> ONNX -> Triton repository) in {repo.parent}")
    _export(["tiny", "--out", str(repo.parent)], "the tiny model")
    return repo


def _bundle_key(bundle: Path) -> str:
    """Names a bundle's export in the cache by its path and the size and mtime of every file (a `stat` each, no
    reads): a bundle finetuned again in place gets a new export, never the stale one."""
    digest = hashlib.sha256(str(bundle.resolve()).encode())
    for f in sorted(p for p in bundle.rglob("*") if p.is_file()):
        st = f.stat()
        digest.update(f"{f.relative_to(bundle)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def local_repository(local: str, log=print, option: str = "--local", bundles: bool = True) -> Path:
    """The repository to serve for `--local`: `tiny`, a Triton model repository (has pipeline/config.pbtxt), or a
    diffusers bundle (has model_index.json), exported once to ONNX and a repository under the cache. `option`
    names the option in errors; `bundles`: whether a bundle is accepted."""
    if local == TINY:
        return ensure_default_repo(log)
    path = Path(local)
    if (path / "pipeline" / "config.pbtxt").is_file():
        return path
    if not bundles or not (path / "model_index.json").is_file():
        raise UserError(
            f"{option} {local}: not a Triton model repository (no pipeline/config.pbtxt), "
            + ("not a diffusers bundle (no model_index.json), " if bundles else "")
            + "and not `tiny` (the random-weight tiny model, for trying things out)"
        )
    root = home() / "local" / _bundle_key(path)
    repo = root / "repo"
    if (repo / "pipeline" / "config.pbtxt").is_file():
        log(f"serving the export of {path} made earlier: {repo}")
        return repo
    log(f"exporting {path} to ONNX and a Triton repository in {root} (once per version of the bundle)")
    _export(["onnx", str(path), "--out", str(root / "onnx")], f"an ONNX export of {path}")
    _export(["repo", str(root / "onnx"), "--out", str(repo)], f"a Triton repository for {path}")
    return repo


@contextlib.contextmanager
def serving_urls(urls: list[str], log=print, local: str | None = None):
    """The given servers (normalised HOST:PORT), or with none the `local` model on a Triton server started here
    for as long as the block runs."""
    from realfake.client.triton import normalise_url

    if urls:
        yield [normalise_url(u) for u in urls]
        return
    with local_server(local, log) as server:
        yield [server.url]


@contextlib.contextmanager
def local_server(local: str | None, log=print):
    """A Triton server started here on the `local` model (see `local_repository`), for as long as the block runs."""
    from realfake.client.server import LocalServer

    if not local:
        raise UserError("no server: pass --url HOST:PORT, or --local")
    repo = local_repository(local, log)
    log(f"starting a local Triton server on {repo}")
    with LocalServer(repo) as server:
        log(f"server ready at {server.url} (log: {server.log_path})")
        yield server
