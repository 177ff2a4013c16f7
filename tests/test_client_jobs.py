"""rf-client jobs against real Triton servers: crashes, dead servers, shards, real-image conditioning, bad input."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from realfake.client.server import LocalServer, free_port

from conftest import VENV_BIN, cli_args, generate_args, rf

pytestmark = pytest.mark.slow

JOB = dict(per_class=12, steps=20, seed=3, batch_size=2, quiet=True)  # with generate_args: cifar10, 120 images


def _pngs(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*.png"))}


def _verify_ok(out):
    r = rf("rf-client", "verify", str(out), "--json")
    report = json.loads(r.stdout)
    assert r.returncode == 0 and report["ok"], report
    return report


@pytest.fixture(scope="module")
def reference(triton, tmp_path_factory):
    """The job made once without incidents: what every interrupted run must end up equal to."""
    out = tmp_path_factory.mktemp("reference")
    r = rf("rf-client", *generate_args(out, triton.url, **JOB))
    assert r.returncode == 0, r.stderr
    files = _pngs(out)
    assert len(files) == 120
    return files


def _start_client(out, *urls, **extra):
    args = [str(VENV_BIN / "rf-client"), *generate_args(out, *urls, **JOB, **extra)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_images(out, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(list(out.glob("*/*.png"))) >= n:
            return
        if proc.poll() is not None:
            pytest.fail(f"client ended early: {proc.communicate()}")
        time.sleep(0.05)
    pytest.fail(f"fewer than {n} images after {timeout}s")


def test_server_killed_mid_job_restarts_and_job_completes(tiny_repo, reference, tmp_path):
    http, grpc = free_port(), free_port()
    out = tmp_path / "out"
    server = LocalServer(tiny_repo, http_port=http, grpc_port=grpc).start()
    try:
        proc = _start_client(out, server.url, server_wait=90)
        _wait_for_images(out, 30, proc)
        server.kill()  # SIGKILL, mid-job
        server = LocalServer(tiny_repo, http_port=http, grpc_port=grpc).start()
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    finally:
        server.stop()
    assert _pngs(out) == reference  # 0 missing, 0 duplicate, 0 damaged: byte for byte
    report = _verify_ok(out)
    assert report["rows"] == 120 and set(report["class_counts"].values()) == {12}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["retries"] >= 1 and summary["failed"] == 0


def test_client_killed_then_resumed(triton, reference, tmp_path):
    out = tmp_path / "out"
    proc = _start_client(out, triton.url)
    _wait_for_images(out, 40, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = len(list(out.glob("*/*.png")))
    assert 0 < partial < 120
    r = rf("rf-client", *generate_args(out, triton.url, **JOB))
    assert r.returncode == 0, r.stderr
    assert "already done" in r.stdout
    assert _pngs(out) == reference
    assert _verify_ok(out)["rows"] == 120
    assert not list(out.glob("*/.*.tmp"))


def test_two_servers_one_dies(triton, tiny_repo, reference, tmp_path):
    out = tmp_path / "out"
    doomed = LocalServer(tiny_repo).start()
    try:
        proc = _start_client(out, triton.url, doomed.url)
        _wait_for_images(out, 30, proc)
        doomed.kill()
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    finally:
        doomed.stop()
    assert _pngs(out) == reference
    summary = json.loads((out / "summary.json").read_text())
    by_url = {s["url"]: s for s in summary["servers"]}
    assert by_url[triton.url]["images"] > 0 and sum(s["images"] for s in summary["servers"]) == 120


def test_shards_together_equal_the_whole_job(triton, reference, tmp_path):
    out = tmp_path / "out"
    procs = [_start_client(out, triton.url, shard=f"{k}/2") for k in range(2)]
    for p in procs:
        _, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
    assert _pngs(out) == reference
    rows = [
        json.loads(line)
        for f in ("manifest.shard-0-of-2.jsonl", "manifest.shard-1-of-2.jsonl")
        for line in (out / f).read_text().splitlines()
    ]
    assert len(rows) == 120 and len({r["path"] for r in rows}) == 120
    assert _verify_ok(out)["rows"] == 120


def _real_folder(root, classes=("airplane", "cat", "dog"), per=2):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per):
            Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(root / c / f"{c}_{i}.png")
    return root


def test_real_conditioned_mode(triton, tiny_onnx, tmp_path):
    from realfake.core.images import load_real_image
    from realfake.serving.components import OrtComponents
    from realfake.serving.sampler import Sampler, Settings

    real = _real_folder(tmp_path / "real")
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"image": "cat_1", "caption": "a cat on a red sofa"}) + "\n")
    (real / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    r = rf(
        "rf-client",
        *generate_args(
            out, triton.url, real=real, versions=2, captions=captions, partial_captions=True, steps=8, quiet=True
        ),
    )
    assert r.returncode == 0, r.stderr
    assert "2 images skipped" in r.stderr  # the broken file, both its versions
    rows = {json.loads(line)["path"]: json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()}
    assert len(rows) == 12  # 3 classes x 2 decodable real images x 2 versions
    # cat's real images sort as broken.png, cat_0.png, cat_1.png: cat_1 version 1 is index 2 * 2 + 1
    row = rows["cat/00005.png"]
    assert row["real_image"] == "cat/cat_1.png" and row["caption"] == "a cat on a red sofa"
    assert row["prompt"] == "photo of cat, a cat on a red sofa, best quality"
    assert row["strength"] == 0.75 and row["guidance_token"] is True
    assert rows["cat/00004.png"]["seed"] != row["seed"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_undecodable_real"] == 2
    assert {f["real_image"] for f in summary["failures"]} == {"cat/broken.png"}
    # the server made exactly what the sampler makes in-process from the same real image and seed
    sampler = Sampler(OrtComponents(tiny_onnx), tiny_onnx)
    init = load_real_image(real / "cat" / "cat_1.png", 32)[None]
    expected = sampler.generate(
        [row["prompt"]], [row["negative_prompt"]], [row["seed"]], Settings(8, 2.0, 0.75, True), init_images=init
    )[0]
    got = np.asarray(Image.open(out / "cat/00005.png"))
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 2


@pytest.mark.parametrize(
    "args, message",
    [
        (dict(per_class=0), "--per-class must be >= 1"),
        (dict(per_class=-3), "--per-class must be >= 1"),
        (dict(per_class=2, shard="2/2"), "--shard 2/2: need 0 <= I < N"),
        (dict(per_class=2, strength=1.5), "--strength must be in (0, 1]"),
    ],
)
def test_bad_arguments(args, message, tmp_path, triton):
    r = rf("rf-client", *generate_args(tmp_path / "o", triton.url, **args))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: {message}")


def test_bad_real_and_caption_inputs(tmp_path, triton):
    empty = tmp_path / "real"
    (empty / "cat").mkdir(parents=True)
    r = rf("rf-client", *generate_args(tmp_path / "o", triton.url, real=empty))
    assert r.returncode == 2 and "holds no images" in r.stderr
    real = _real_folder(tmp_path / "real2", classes=("cat",), per=1)
    caps = tmp_path / "c.jsonl"
    caps.write_text('{"image": "cat_0", "caption": "ok"}\n{"image": "cat_0" "caption": "x"}\n')
    r = rf("rf-client", *generate_args(tmp_path / "o", triton.url, real=real, captions=caps))
    assert r.returncode == 2 and "line 2 is malformed" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_resume_with_changed_settings_is_refused_then_forced(tmp_path, triton):
    out = tmp_path / "o"
    job = dict(per_class=1, steps=3, quiet=True)
    assert rf("rf-client", *generate_args(out, triton.url, **job)).returncode == 0
    before = _pngs(out)
    r = rf("rf-client", *generate_args(out, triton.url, **job), "--guidance-scale", "3.0")
    # the old spelling --guidance on purpose: this checks the alias still reaches --guidance-scale
    assert r.returncode == 2 and "other settings (guidance_scale)" in r.stderr
    assert _pngs(out) == before  # nothing finished was touched
    assert rf("rf-client", *generate_args(out, triton.url, **job, guidance_scale=3.0, force=True)).returncode == 0


def test_bench_writes_table_json_csv(triton, tmp_path):
    stem = tmp_path / "bench"
    r = rf(
        "rf-client",
        "bench",
        *cli_args(
            url=triton.url,
            metrics_url=triton.metrics_url,
            concurrency="1,2",
            batch="1,2",
            requests=3,
            steps=4,
            out=stem,
        ),
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(stem.with_suffix(".json").read_text())
    assert [(row["concurrency"], row["batch"]) for row in data["results"]] == [(1, 1), (2, 1), (1, 2), (2, 2)]
    for row in data["results"]:
        assert row["errors"] == 0 and row["images"] == 3 * row["batch"] and row["images_per_sec"] > 0
        assert row["latency_p50_ms"] <= row["latency_p95_ms"] <= row["latency_p99_ms"]
        # the server's own account (Triton's metrics): it cannot exceed what the client waited, and each BLS
        # component ran once per denoising step or so (the UNet) or once per request (text encoder, VAE decoder)
        assert 0 < row["server_compute_ms"] <= row["server_request_ms"] <= row["latency_mean_ms"] * 1.05, row
        assert {"text_encoder", "unet", "vae_decoder"} <= set(row["components_ms"]), row
        assert sum(row["components_ms"].values()) <= row["server_compute_ms"] * 1.05, row
    header = stem.with_suffix(".csv").read_text().splitlines()[0]
    assert header.startswith("concurrency,batch,") and "unet_ms" in header and "server_queue_ms" in header
    assert "p95 ms" in r.stdout and "where the time goes" in r.stdout
    assert "client ceiling (png" in r.stdout and data["client_ceiling"]["images_per_sec"] > 0
    assert not list(tmp_path.glob(".rf-client-ceiling-*"))  # its scratch files are gone


def test_servers_on_other_engines_are_refused_unless_mixed(triton, tiny_onnx, tmp_path):
    """Same weights, other engine (here another scheduler): refused up front, refused when it joins mid-job,
    refused on resume; accepted with --mixed-engines, each manifest row naming the engine that made it."""
    from realfake.client.runner import Runner
    from realfake.client.triton import PipelineClient
    from realfake.core import dataset as ds
    from realfake.core.classes import load_classes
    from realfake.core.errors import UserError
    from realfake.export.triton_repo import write_repository

    other_repo = write_repository(tiny_onnx, tmp_path / "ddim_repo", scheduler="ddim")
    small = dict(per_class=2, steps=4, batch_size=2, quiet=True)
    with LocalServer(other_repo) as other:
        mine, theirs = PipelineClient(triton.url).card(), PipelineClient(other.url).card()
        assert mine.identity == theirs.identity
        assert (mine.engine, theirs.engine) == ("onnxruntime-cpu fp32, unipc", "onnxruntime-cpu fp32, ddim")

        out = tmp_path / "both"
        r = rf("rf-client", *generate_args(out, triton.url, other.url, **small))
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            "error: the servers run the model on different engines (onnxruntime-cpu fp32, ddim; onnxruntime-cpu "
            "fp32, unipc): images would depend on the server that made them; use servers of one kind, or "
            "--mixed-engines to accept that"
        ]
        assert not out.exists() or not list(out.glob("*/*.png"))

        r = rf("rf-client", *generate_args(out, triton.url, other.url, **small, mixed_engines=True))
        assert r.returncode == 0, r.stderr
        rows = ds.read_manifest_rows(out / "manifest.jsonl")
        assert len(rows) == 20 and {r["engine"] for r in rows} <= {mine.engine, theirs.engine}
        assert all(r["engine"] == (mine if r["server"] == triton.url else theirs).engine for r in rows)
        assert json.loads((out / "job.json").read_text())["engine"] == "mixed"

        single = tmp_path / "single"
        assert rf("rf-client", *generate_args(single, triton.url, **small)).returncode == 0
        assert json.loads((single / "job.json").read_text())["engine"] == mine.engine
        r = rf("rf-client", *generate_args(single, other.url, **small))
        assert r.returncode == 2 and "other settings (engine)" in r.stderr

        # a server that passes the start-up check but serves another engine when a worker connects (it was
        # down at the start, or restarted with another repository) is refused and its work goes elsewhere
        spec = ds.JobSpec(classes=[], per_class=2, steps=4, model=mine.identity, engine=mine.engine)
        cls = load_classes("cifar10")[0]
        items = [ds.WorkItem(cls, i, ds.image_seed(0, cls.id, i), "photo of an airplane") for i in range(6)]
        late = tmp_path / "late"
        late.mkdir()
        writer = ds.ManifestWriter(late / "manifest.jsonl")
        summary = Runner(late, spec, items, [other.url, triton.url], writer, batch=2).run()
        writer.close()
        by_url = {s["url"]: s for s in summary.servers}
        assert summary.images == 6 and by_url[triton.url]["images"] == 6 and by_url[other.url]["images"] == 0
        assert (
            "runs engine 'onnxruntime-cpu fp32, ddim', this job's is 'onnxruntime-cpu fp32, unipc'"
            in (by_url[other.url]["refused"])
        )
        with pytest.raises(UserError, match="no server fits this job"):
            Runner(late, spec, items[:2], [other.url], ds.ManifestWriter(late / "m2.jsonl")).run()


NSS_WRAPPER = "libnss_wrapper.so"


def _nss_wrapper_env(hosts):
    """Resolve names from `hosts` in a child process through glibc (nss_wrapper, Debian's libnss-wrapper)."""
    import ctypes.util

    if not any(Path(d, NSS_WRAPPER).exists() for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu")) and (
        ctypes.util.find_library("nss_wrapper") is None
    ):
        pytest.skip("libnss-wrapper is not installed (apt-get install libnss-wrapper; make installs it)")
    return {"LD_PRELOAD": NSS_WRAPPER, "NSS_WRAPPER_HOSTS": str(hosts)}


def _write_hosts(hosts, name, *addresses):
    """Replace the hosts file at once (nss_wrapper reloads it when its inode or mtime changes)."""
    tmp = hosts.with_suffix(".new")
    tmp.write_text("".join(f"{a} {name}\n" for a in addresses))
    tmp.replace(hosts)


def test_url_name_follows_the_fleet_as_servers_leave_and_join(tiny_repo, reference, tmp_path):
    """`--url NAME:PORT` with NAME resolving to two loopback addresses (two real servers): mid-job one server is
    killed and leaves the name, another joins it; the job uses the newcomer and ends equal to the reference."""
    name, hosts = "fleet.rf.test", tmp_path / "hosts"
    env = _nss_wrapper_env(hosts)
    port = free_port("127.0.0.2")
    stable, leaving, joining = (
        LocalServer(tiny_repo, host=f"127.0.0.{k}", http_port=port, grpc_port=free_port()) for k in (2, 3, 4)
    )
    out = tmp_path / "out"
    try:
        for server in (stable, leaving, joining):
            server.start()
        _write_hosts(hosts, name, "127.0.0.2", "127.0.0.3")
        args = [str(VENV_BIN / "rf-client"), *generate_args(out, f"{name}:{port}", **JOB, rediscover_every=0.5)]
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env}
        )
        _wait_for_images(out, 20, proc)
        leaving.kill()
        time.sleep(1.1)  # a new mtime second, so the resolver sees the change
        _write_hosts(hosts, name, "127.0.0.2", "127.0.0.4")
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr
    finally:
        for server in (stable, leaving, joining):
            server.stop()
    assert _pngs(out) == reference
    summary = json.loads((out / "summary.json").read_text())
    by_url = {s["url"]: s for s in summary["servers"]}
    assert set(by_url) == {f"127.0.0.{k}:{port}" for k in (2, 3, 4)}, by_url
    assert by_url[f"127.0.0.4:{port}"]["images"] > 0, by_url  # the newcomer was used
    assert by_url[f"127.0.0.3:{port}"]["left_fleet"] and not by_url[f"127.0.0.2:{port}"]["left_fleet"]
    assert sum(s["images"] for s in summary["servers"]) == 120
