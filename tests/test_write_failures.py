"""A job whose disk fails stops at once with one line, keeps a dataset that verifies, and a resume elsewhere
finishes it byte-identical to an uninterrupted run: on a real full tmpfs where this machine lets the test mount
one, and with ENOSPC injected at the image write call (in a child process) everywhere."""

import shutil
import subprocess
import sys
import time

import pytest

from conftest import generate_args, rf

pytestmark = pytest.mark.slow

JOB = dict(
    per_class=40, steps=2, seed=3, batch_size=4, quiet=True
)  # 400 images of ~3 KB: about 1.5 MB with the manifest

INJECT = """
import errno, sys, threading
import realfake.client.writer as writer
real, count, lock = writer.write_atomic, [0], threading.Lock()
def failing(path, data, durable=False):
    with lock:
        count[0] += 1
        n = count[0]
    if n > {after}:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return real(path, data, durable=durable)
writer.write_atomic = failing
from realfake.client.cli import main
sys.argv = ["rf-client", *{argv!r}]
main()
"""


def _files(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*.png"))}


def _check_stopped_and_resumable(r, elapsed, out, roomy, full_run, url):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert elapsed < 30, elapsed
    assert len(lines) == 1 and lines[0].startswith("error: cannot write "), r.stderr[-2000:]
    assert "No space left on device" in lines[0] and "re-run the same command to resume" in lines[0]
    verify = rf("rf-client", "verify", str(out))
    assert verify.returncode == 0, verify.stdout  # every listed image is whole, and nothing is unlisted
    made = _files(out)
    assert 0 < len(made) < 400
    # resume on a roomy disk: the finished images are kept, the rest made, identical to an uninterrupted run
    shutil.copytree(out, roomy)
    again = rf("rf-client", *generate_args(roomy, url, **JOB))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(made)} already done" in again.stdout
    assert _files(roomy) == _files(full_run)
    assert rf("rf-client", "verify", str(roomy)).returncode == 0


@pytest.fixture(scope="module")
def full_run(triton, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "out"
    r = rf("rf-client", *generate_args(out, triton.url, **JOB))
    assert r.returncode == 0, r.stderr
    assert len(_files(out)) == 400
    return out


def test_enospc_at_the_write_call_stops_the_job(triton, full_run, tmp_path):
    out = tmp_path / "out"
    code = INJECT.format(after=150, argv=generate_args(out, triton.url, **JOB))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    _check_stopped_and_resumable(r, time.monotonic() - t0, out, tmp_path / "roomy", full_run, triton.url)


def test_a_full_tmpfs_stops_the_job(triton, full_run, tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({result.stderr.decode().strip() or 'not permitted'}); "
            "the injected-ENOSPC test covers the same path"
        )
    try:
        out = mount / "out"
        t0 = time.monotonic()
        r = rf("rf-client", *generate_args(out, triton.url, **JOB))
        _check_stopped_and_resumable(r, time.monotonic() - t0, out, tmp_path / "roomy", full_run, triton.url)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
