"""`rf-client bench`: images/sec and request latency percentiles at several concurrencies and batch sizes."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from realfake.client.server_metrics import scrape, settled_server_time
from realfake.client.triton import PipelineClient
from realfake.core.files import write_atomic


@dataclass
class BenchRow:
    concurrency: int
    batch: int
    requests: int
    images: int
    wall_seconds: float
    images_per_sec: float
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    errors: int
    # from the server's own metrics (None when they were not read): milliseconds per request
    latency_mean_ms: float | None = None
    server_request_ms: float | None = None  # the pipeline's whole time on the server
    server_queue_ms: float | None = None  # waiting in its queue (dynamic batcher)
    server_compute_ms: float | None = None  # its compute, components included
    server_batch: float | None = None  # requests per pipeline execution
    client_overhead_ms: float | None = None  # mean latency less the server's time: network, (de)serialisation
    components_ms: dict | None = None  # component model -> ms per pipeline request (BLS placement)


def _arrays(batch: int, seed0: int, steps: int, guidance_scale: float, prompt: str) -> dict[str, np.ndarray]:
    return {
        "PROMPT": np.array([[prompt.encode()]] * batch, dtype=np.object_),
        "NEGATIVE_PROMPT": np.array([[b"blurry"]] * batch, dtype=np.object_),
        "SEED": np.arange(seed0, seed0 + batch, dtype=np.int64).reshape(batch, 1),
        "STEPS": np.full((batch, 1), steps, dtype=np.int32),
        "GUIDANCE_SCALE": np.full((batch, 1), guidance_scale, dtype=np.float32),
    }


def measure(
    url: str,
    concurrency: int,
    batch: int,
    requests: int,
    steps: int,
    guidance_scale: float,
    warmup: int = 1,
    metrics_url: str | None = None,
) -> BenchRow:
    """Send `requests` requests of `batch` images from `concurrency` threads; time each and the whole. With
    `metrics_url`, the server's own counters before and after say where each request's time went."""
    prompt = "photo of a tench, best quality"
    warm = PipelineClient(url)
    for k in range(warmup):
        warm.infer(_arrays(batch, 10_000 + k, steps, guidance_scale, prompt))
    before = scrape(metrics_url) if metrics_url else None
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker() -> None:
        nonlocal errors
        client = PipelineClient(url)  # tritonclient.http clients belong to the thread that made them
        while True:
            with lock:
                k = next(counter, None)
            if k is None:
                return
            t0 = time.perf_counter()
            try:
                client.infer(_arrays(batch, k * batch, steps, guidance_scale, prompt))
            except Exception:  # noqa: BLE001 - counted, the benchmark goes on
                with lock:
                    errors += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    images = len(latencies) * batch
    server = settled_server_time(metrics_url, before, len(latencies)) if before is not None else None
    extra = {}
    if server is not None:
        mean = float(np.mean(lat))
        extra = dict(
            latency_mean_ms=round(mean, 2),
            server_request_ms=round(server.request_ms, 2),
            server_queue_ms=round(server.queue_ms, 2),
            server_compute_ms=round(server.compute_ms, 2),
            server_batch=round(server.batch, 2),
            client_overhead_ms=round(mean - server.request_ms, 2),
            components_ms={k: round(v, 2) for k, v in server.components.items()},
        )
    return BenchRow(
        concurrency=concurrency,
        batch=batch,
        requests=requests,
        images=images,
        wall_seconds=round(wall, 4),
        images_per_sec=round(images / wall, 4) if wall > 0 else 0.0,
        latency_p50_ms=round(float(np.percentile(lat, 50)), 2),
        latency_p95_ms=round(float(np.percentile(lat, 95)), 2),
        latency_p99_ms=round(float(np.percentile(lat, 99)), 2),
        errors=errors,
        **extra,
    )


def write_results(rows: list[BenchRow], out: Path, meta: dict) -> tuple[Path, Path]:
    """`out`.json (with the settings) and `out`.csv."""
    json_path, csv_path = out.with_suffix(".json"), out.with_suffix(".csv")
    write_atomic(json_path, json.dumps({**meta, "results": [asdict(r) for r in rows]}, indent=2).encode())
    buf = io.StringIO()
    flat = [_flat(r) for r in rows]
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for f in flat for k in f)))
    writer.writeheader()
    writer.writerows(flat)
    write_atomic(csv_path, buf.getvalue().encode())
    return json_path, csv_path


def _flat(row: BenchRow) -> dict:
    """A CSV row: the components' times as columns of their own."""
    out = asdict(row)
    for name, ms in (out.pop("components_ms") or {}).items():
        out[f"{name}_ms"] = ms
    return out


def textured_images(count: int, size: int = 512, seed: int = 0) -> np.ndarray:
    """Photo-like uint8 test images (smooth colour fields, edges and grain), so encoders work as hard as on real
    generated images: a flat image would make PNG look 10x cheaper than it is."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), np.uint8)
    for k in range(count):
        coarse = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), np.float32)
        grain = rng.normal(0.0, 10.0, (size, size, 3))
        out[k] = np.clip(smooth + grain, 0, 255).astype(np.uint8)
    return out


@dataclass
class CeilingRow:
    image_format: str
    quality: int | None
    workers: int
    images: int
    images_per_sec: float
    mean_bytes: int


def client_ceiling(
    folder: Path, fmt: str, quality: int, workers: int | None, images: np.ndarray, seconds: float = 3.0
) -> CeilingRow:
    """What one client process sustains with no model in the loop: each image is copied out of a response-like
    buffer, then encoded, hashed, written (fsync'd) and listed in a manifest by the same code a job uses. Runs
    batches of `images` for at least `seconds`."""
    from realfake.client.writer import ImageWriter
    from realfake.core.dataset import ManifestWriter
    from realfake.core.images import FORMATS

    folder.mkdir(parents=True, exist_ok=True)
    writer = ImageWriter(folder, fmt, quality, workers=workers)
    manifest = ManifestWriter(folder / "manifest.jsonl")
    raw = images.tobytes()  # the HTTP response body a server sends
    done, sizes, lock = [0], [0], threading.Lock()

    def finished(facts, error):
        if error is not None:
            raise error
        with lock:
            for f in facts:
                manifest.append(f)
                sizes[0] += f["size"]
            done[0] += len(facts)

    start, submitted, rnd = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds or submitted == 0:
        decoded = np.frombuffer(raw, np.uint8).reshape(images.shape).copy()
        rels = [f"c/{rnd:04d}_{k:03d}{FORMATS[fmt]}" for k in range(len(decoded))]
        writer.write_batch(rels, decoded, finished)
        submitted += len(decoded)
        rnd += 1
    writer.close()
    manifest.close()
    wall = time.perf_counter() - start
    if writer.failed:
        raise writer.failed
    return CeilingRow(
        fmt,
        quality if fmt != "png" else None,
        writer.workers,
        done[0],
        round(done[0] / wall, 1),
        sizes[0] // max(done[0], 1),
    )
