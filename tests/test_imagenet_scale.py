"""The ImageNet job at the largest size this machine runs in a test: `--classes imagenet --per-class 2` (2,000
images in 1,000 class folders) through a real local Triton with the tiny model. The client is killed twice and the
server once, at points drawn at random (seeded, so a failure replays), and each time the same command resumes; the
result verifies and is byte-identical to an uninterrupted run."""

import json
import random
import signal
import subprocess
import time

import pytest

from realfake.client.server import LocalServer, free_port

from conftest import VENV_BIN, generate_args, rf

pytestmark = pytest.mark.slow

JOB = dict(classes="imagenet", per_class=2, steps=1, seed=5, batch_size=8, concurrency=2, quiet=True)
TOTAL = 2000


def _rows(out) -> int:
    path = out / "manifest.jsonl"
    return sum(1 for _ in open(path)) if path.exists() else 0


def _start(out, url) -> subprocess.Popen:
    args = [str(VENV_BIN / "rf-client"), *generate_args(out, url, **JOB)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_rows(out, rows, proc) -> None:
    deadline = time.monotonic() + 300
    while _rows(out) < rows:
        assert proc.poll() is None, f"client ended early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"fewer than {rows} rows after 300 s"
        time.sleep(0.05)


def _run_until(out, url, rows, kill) -> subprocess.Popen:
    """Start the client and end it with `kill` once the manifest holds `rows` rows."""
    proc = _start(out, url)
    _wait_for_rows(out, rows, proc)
    kill(proc)
    proc.wait(timeout=60)
    return proc


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*.png"))}


def test_imagenet_job_survives_client_and_server_kills(triton, tiny_repo, tmp_path):
    rng = random.Random(2024)
    first, second, third = sorted(rng.sample(range(150, TOTAL - 300), 3))
    reference, out = tmp_path / "reference", tmp_path / "out"
    r = rf("rf-client", *generate_args(reference, triton.url, **JOB))
    assert r.returncode == 0, r.stderr
    assert len(_files(reference)) == TOTAL and len({p.split("/")[0] for p in _files(reference)}) == 1000

    port = free_port()
    server = LocalServer(tiny_repo, http_port=port, grpc_port=free_port()).start()
    url = server.url
    try:
        _run_until(out, url, first, lambda p: p.send_signal(signal.SIGKILL))  # a crash: nothing gets to clean up
        stopped = _run_until(out, url, second, lambda p: p.send_signal(signal.SIGTERM))  # the scheduler's stop
        assert stopped.returncode == 128 + signal.SIGTERM and "interrupted" in stopped.stderr.read()
        # after a stop every manifest row has its whole image (images of the earlier crash may still lack rows)
        partial = json.loads(rf("rf-client", "verify", str(out), "--no-decode", "--json").stdout)
        assert partial["rows"] >= second
        assert partial["missing"] == partial["hash_mismatch"] == partial["duplicate_rows"] == []
        proc = _start(out, url)
        _wait_for_rows(out, third, proc)
        server.kill()  # the server dies mid-job and comes back on the same port
        server = LocalServer(tiny_repo, http_port=port, grpc_port=server.grpc_port).start()
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
    finally:
        server.stop()
    assert "already done" in stdout
    assert _files(out) == _files(reference)
    verify = rf("rf-client", "verify", str(out), "--json")
    assert verify.returncode == 0, verify.stdout[-2000:]
    report = json.loads(verify.stdout)
    assert report["rows"] == TOTAL and len(report["class_counts"]) == 1000
