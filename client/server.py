"""Start, watch and stop a local Triton server: a full Triton install (`--triton-bin`, `tritonserver` on PATH, or
NGC's /opt/tritonserver layout) or the one nvidia-pytriton bundles, which has the Python backend only.

The repository's models name the backends they need (config.pbtxt `backend:` or `platform:`); the first install
that has them all serves it, and when none has, the server is refused before it starts, in one line naming the
backends that are missing (a TensorRT repository cannot load under pytriton's server: it would fail model by
model in Triton's log instead).

Pure standard library, so the light client can start the embedded default server without torch.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from realfake.core.defaults import CUDA_MEMORY_POOL_MB
from realfake.core.errors import UserError

LOOPBACK = "127.0.0.1"


NGC_TRITON = Path("/opt/tritonserver/bin/tritonserver")  # where the official Triton images install it
# config.pbtxt `platform:` values and the backend that serves each
PLATFORM_BACKENDS = {"tensorrt_plan": "tensorrt", "onnxruntime_onnx": "onnxruntime", "pytorch_libtorch": "pytorch"}


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path  # folder holding one folder per backend: python/, tensorrt/, onnxruntime/, ...
    stub: Path | None  # python backend stub matching this Python, when the install ships several
    libs: tuple[Path, ...]  # extra shared-library folders

    @property
    def backend_names(self) -> set[str]:
        return {p.name for p in self.backends.iterdir() if p.is_dir()} if self.backends.is_dir() else set()


def repository_backends(repo: Path) -> dict[str, list[str]]:
    """backend -> the models of `repo` that need it, from each model's config.pbtxt."""
    needed: dict[str, list[str]] = {}
    for config in sorted(Path(repo).glob("*/config.pbtxt")):
        text = config.read_text(errors="replace")
        backend = re.search(r'^\s*backend:\s*"([^"]+)"', text, re.M)
        platform = re.search(r'^\s*platform:\s*"([^"]+)"', text, re.M)
        name = backend[1] if backend else PLATFORM_BACKENDS.get(platform[1], platform[1]) if platform else None
        if name:
            needed.setdefault(name, []).append(config.parent.name)
    return needed


def _pytriton_install() -> TritonInstall | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        return None
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UserError(f"nvidia-pytriton ships no Python backend stub for Python {version}")
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(binary, root / "backends", stub, (libs,) if libs.is_dir() else ())


def _full_install(binary: Path) -> TritonInstall:
    """A Triton installed as NGC lays it out: <root>/bin/tritonserver beside <root>/backends/."""
    binary = Path(binary).absolute()
    backends = binary.parent.parent / "backends"
    if not backends.is_dir():  # a link to the binary (e.g. in /usr/local/bin): the install it points into
        backends = binary.resolve().parent.parent / "backends"
    return TritonInstall(binary, backends, None, ())


def triton_installs(triton_bin: str | Path | None = None) -> list[TritonInstall]:
    """The Triton servers to choose from, in order: `triton_bin` alone when given; else nvidia-pytriton's (it
    matches this venv's Python), `tritonserver` on PATH, and NGC's /opt/tritonserver."""
    if triton_bin is not None:
        path = Path(triton_bin)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise UserError(f"--triton-bin {path} is not an executable tritonserver")
        return [_full_install(path)]
    found = [i for i in [_pytriton_install()] if i is not None]
    on_path = shutil.which("tritonserver")
    for candidate in [Path(on_path)] if on_path else []:
        found.append(_full_install(candidate))
    if NGC_TRITON.is_file() and all(i.binary.resolve() != NGC_TRITON.resolve() for i in found):
        found.append(_full_install(NGC_TRITON))
    return found


def find_triton(repo: str | Path | None = None, triton_bin: str | Path | None = None) -> TritonInstall:
    """The first Triton install that has every backend `repo`'s models need (see the module docstring)."""
    installs = triton_installs(triton_bin)
    if not installs:
        raise UserError(
            "no Triton server found: install the server extra (`pip install 'realfake[server,cpu]'` or "
            "`[server,gpu]`, which brings nvidia-pytriton's tritonserver), put a full Triton's `tritonserver` on "
            "PATH or pass --triton-bin, or pass --url of a running server"
        )
    needed = repository_backends(Path(repo)) if repo is not None else {}
    for install in installs:
        if set(needed) <= install.backend_names:
            return install
    best = installs[0]
    missing = sorted(set(needed) - best.backend_names)
    models = ", ".join(f"{b} ({', '.join(needed[b][:3])}{', ...' if len(needed[b]) > 3 else ''})" for b in missing)
    has = ", ".join(sorted(best.backend_names)) or "none"
    raise UserError(
        f"the repository {repo} needs the Triton backend(s) {models}, which no Triton server here has "
        f"({best.binary} has: {has}): use a full Triton install (NGC's image, or --triton-bin "
        f"/opt/tritonserver/bin/tritonserver), or write the repository for --runtime python-ort"
    )


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """True when nothing listens on the port (a restarted server may reuse a port in TIME_WAIT, as Triton does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def visible_gpus() -> int:
    """How many CUDA devices a server started from here sees: CUDA_VISIBLE_DEVICES' list when it is set, else
    what `nvidia-smi -L` lists (none without it). No model library is loaded to count them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.splitlines() if line.startswith("GPU "))


def cuda_pool_flags(gpus: int | None = None, megabytes: int = CUDA_MEMORY_POOL_MB) -> list[str]:
    """Triton's CUDA memory pool for each GPU the server sees (core.defaults.CUDA_MEMORY_POOL_MB says why); none
    without a GPU."""
    gpus = visible_gpus() if gpus is None else gpus
    return [f"--cuda-memory-pool-byte-size={g}:{megabytes << 20}" for g in range(gpus)]


class LocalServer:
    """A tritonserver child process serving `repo` on loopback; use as a context manager."""

    def __init__(
        self,
        repo: str | Path,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        host: str = LOOPBACK,
        log_path: str | Path | None = None,
        ready_timeout: float = 300.0,
        triton_bin: str | Path | None = None,
    ):
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise UserError(f"model repository {self.repo} does not exist (build it with `rf-export repo`)")
        self.install = find_triton(self.repo, triton_bin)  # refused here, before a port is taken
        for port in (http_port, grpc_port, metrics_port):
            if port is not None and not port_is_free(port, host):
                raise UserError(
                    f"port {port} on {host} is in use: pick another with --http-port/--grpc-port/--metrics-port"
                )
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics_port = metrics_port or free_port(host)
        self.ready_timeout = ready_timeout
        self._workdir = Path(tempfile.mkdtemp(prefix="rf-triton-"))
        self.log_path = Path(log_path) if log_path else self._workdir / "tritonserver.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """Triton's Prometheus metrics (per-model request, queue and compute time), bound like the other ports."""
        return f"{self.host}:{self.metrics_port}"

    def _backend_dir(self, install: TritonInstall) -> Path:
        """A private backend folder: the wheel's python backend plus the stub for this Python version."""
        if install.stub is None:
            return install.backends
        target = self._workdir / "backends" / "python"
        target.mkdir(parents=True, exist_ok=True)
        for item in (install.backends / "python").iterdir():
            if item.is_file():
                (target / item.name).symlink_to(item)
        shutil.copy2(install.stub, target / install.stub.name)
        return target.parent

    def _env(self, install: TritonInstall) -> dict[str, str]:
        env = dict(os.environ)
        # The python backend stub runs the `python3` it finds on PATH: make it this interpreter's.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [str(p) for p in install.libs]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            libs.append(libdir)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [env.get("LD_LIBRARY_PATH", "")]).strip(os.pathsep)
        return env

    def launcher(self) -> tuple[list[str], dict[str, str]]:
        """The tritonserver binary with this install's backend folder, and the environment it needs: what the
        official Triton image has built in (tests start the serving image's entrypoint on it)."""
        install = self.install
        return [str(install.binary), f"--backend-directory={self._backend_dir(install)}"], self._env(install)

    def start(self) -> LocalServer:
        launcher, env = self.launcher()
        cmd = [
            *launcher,
            f"--model-repository={self.repo}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--exit-timeout-secs=10",
            "--log-verbose=0",
            *cuda_pool_flags(),
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def exit_reason(self) -> str:
        """Why the server's process ended, in words: a death by signal mid-work is most often the kernel's
        out-of-memory killer (it ends a process before Python sees a MemoryError), said with the repository's
        memory settings so the user knows what to change."""
        code = self.process.returncode if self.process is not None else None
        text = f"Triton exited with code {code}"
        if code is None or (code >= 0 and code not in (137, 139)):
            return text
        params = {}
        config = self.repo / "pipeline" / "config.pbtxt"
        if config.is_file():
            params = dict(re.findall(r'key: "(\w+)"\s*value: \{ string_value: "([^"]*)" \}', config.read_text()))
        limit = params.get("max_images_per_run", "0")
        budget = params.get("memory_budget_gb")
        where = f" for a memory budget of {budget} GB" if budget else ""
        bound = f"samples at most {limit} images per call{where}" if limit != "0" else "has no images-per-call bound"
        return (
            f"{text} (killed by a signal): most often the kernel's out-of-memory killer; this repository {bound}: "
            "write it again with a lower `rf-export repo --memory-budget` (or send a smaller --batch-size)"
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise UserError(f"{self.exit_reason()} while starting{self._failure_hint()}; log: {self.log_path}")
            if server_ready(self.url):
                return
            time.sleep(0.25)
        raise UserError(
            f"Triton was not ready after {self.ready_timeout:.0f}s{self._failure_hint()}; log: {self.log_path}"
        )

    def _failure_hint(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        failed = re.findall(r"failed to load '([^']+)'", text)
        if failed:
            return f" (model(s) failed to load: {', '.join(sorted(set(failed)))})"
        if "Address already in use" in text or "address already in use" in text.lower():
            return " (a port is already in use)"
        return ""

    def stop(self, timeout: float = 30.0) -> None:
        """Stop Triton and every process of its group (the Python-backend stubs too, which outlive a Triton that
        died or was killed hard, holding memory and, on a GPU, GPU memory)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait()
        _signal_group(self.process.pid, signal.SIGKILL)  # whatever of the group is left: orphaned stubs

    def kill(self) -> None:
        """SIGKILL the server and its stubs (failure-injection tests)."""
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def server_ready(url: str, timeout: float = 2.0) -> bool:
    """True when the server at host:port answers ready on its HTTP health endpoint."""
    try:
        with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def _signal_group(pgid: int, sig: int) -> None:
    """Signal a process group that may already be gone."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
