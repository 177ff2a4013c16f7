"""Stopping means stopped: `rf-serve` stopped by SIGTERM (how Kubernetes, Slurm, Docker and systemd stop it), or
left behind by a tritonserver killed hard, leaves no process of that server alive and its ports free."""

import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from realfake.client.server import free_port, port_is_free, server_ready

from conftest import VENV_BIN, cli_args

pytestmark = pytest.mark.slow


def _processes():
    """(pid, state, parent pid, process group) of every process, from /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(stat.parent.name), fields[0], int(fields[1]), int(fields[2])


def _children(pid: int) -> list[int]:
    return [child for child, _, parent, _ in _processes() if parent == pid]


def _group(pgid: int) -> list[int]:
    """Live processes of a process group (zombies excluded: they hold no memory or port)."""
    return [pid for pid, state, _, group in _processes() if group == pgid and state != "Z"]


def _start_serve(tiny_repo):
    http, grpc, metrics = free_port(), free_port(), free_port()
    cmd = [str(VENV_BIN / "rf-serve"), *cli_args(repo=tiny_repo, http_port=http, grpc_port=grpc, metrics_port=metrics)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # rf-serve itself has seen Triton ready (not only the port answering)
    assert line.startswith("Triton ready"), (line, proc.communicate())
    assert server_ready(f"127.0.0.1:{http}")
    assert f"metrics 127.0.0.1:{metrics}" in line and "nv_inference_count" in _metrics_text(metrics)
    (triton,) = [pid for pid in _children(proc.pid) if "tritonserver" in Path(f"/proc/{pid}/cmdline").read_text()]
    assert len(_group(triton)) > 1  # tritonserver and its Python-backend stubs
    return proc, triton, (http, grpc, metrics)


def _metrics_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _all_gone(triton: int, ports) -> None:
    deadline = time.monotonic() + 15
    while _group(triton) or not all(port_is_free(p) for p in ports):
        assert time.monotonic() < deadline, (
            f"left alive: {_group(triton)}, ports free: {[port_is_free(p) for p in ports]}"
        )
        time.sleep(0.2)


def test_sigterm_stops_triton_and_its_stubs(tiny_repo):
    proc, triton, ports = _start_serve(tiny_repo)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    _all_gone(triton, ports)


def test_triton_killed_hard_is_cleaned_up_and_reported(tiny_repo):
    proc, triton, ports = _start_serve(tiny_repo)
    os.kill(triton, signal.SIGKILL)  # only Triton: its stubs would live on as orphans
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: Triton exited with code -9 (killed by a signal): most often the kernel's out-of-")
    assert "samples at most" in last and "--memory-budget" in last and "; log: " in last
    _all_gone(triton, ports)
