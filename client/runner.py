"""Run a dataset job against one or many Triton servers: bounded in-flight work per server, retries on
another server, dead servers dropped and re-probed, images encoded and written off the request threads
(client/writer.py), the manifest appended and fsync'd, progress and a summary. Nothing finished is ever lost or
made twice; a write error stops the job at once, with the manifest listing exactly the images on disk.
"""

from __future__ import annotations

import contextlib
import functools
import json
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from realfake.client.server import server_ready
from realfake.client.triton import PipelineClient
from realfake.client.writer import ImageWriter
from realfake.core.dataset import JobSpec, ManifestWriter, WorkItem, compact_manifest, image_relpath, index_width
from realfake.core.defaults import DEFAULT_QUALITY
from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.core.images import FORMATS


@dataclass
class Batch:
    items: list[WorkItem]
    attempts: int = 0
    last_error: str = ""


@dataclass
class ServerState:
    url: str
    healthy: bool = True
    images: int = 0
    requests: int = 0
    failures: int = 0
    busy_seconds: float = 0.0
    engine: str | None = None  # from the server's model card, read at every (re)connection; in manifest rows
    refused: str | None = None  # why this server is not used for this job (it serves something else)
    gone: bool = False  # its --url name no longer resolves to it (it left the fleet); it may come back
    threads: list[threading.Thread] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def summary(self, wall: float) -> dict:
        return {
            "url": self.url,
            "engine": self.engine,
            "images": self.images,
            "requests": self.requests,
            "failures": self.failures,
            "images_per_sec": round(self.images / wall, 3) if wall > 0 else 0.0,
            "refused": self.refused,
            "left_fleet": self.gone,
        }


@dataclass
class Summary:
    images: int
    skipped: int
    failed: int
    retries: int
    wall_seconds: float
    servers: list[dict]
    failures: list[dict]
    skipped_real: int = 0
    path: Path | None = None  # where the summary was written (summary.json, or per shard)

    @property
    def images_per_sec(self) -> float:
        return self.images / self.wall_seconds if self.wall_seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "images": self.images,
            "skipped_already_done": self.skipped,
            "failed": self.failed,
            "skipped_undecodable_real": self.skipped_real,
            "retries": self.retries,
            "wall_seconds": round(self.wall_seconds, 3),
            "images_per_sec": round(self.images_per_sec, 3),
            "servers": self.servers,
            "failures": self.failures[:100],
        }


class Runner:
    """Generates `items` into `out`; call `run()`."""

    def __init__(
        self,
        out: Path,
        spec: JobSpec,
        items: list[WorkItem],
        urls: list[str],
        manifest: ManifestWriter,
        *,
        batch: int = 4,
        concurrency: int = 2,
        max_attempts: int = 4,
        server_wait: float = 120.0,
        load_real: Callable[[WorkItem], np.ndarray] | None = None,
        on_progress: Callable[[int, int, dict], None] | None = None,
        writer: ImageWriter | None = None,
        row_extra: dict | None = None,
        discover: Callable[[], list[str]] | None = None,
        rediscover_every: float = 10.0,
        log: Callable[[str], None] | None = None,
    ):
        self.out, self.spec, self.manifest = out, spec, manifest
        self.width = index_width(spec)
        self.suffix = FORMATS[spec.image_format]
        self.writer = writer or ImageWriter(out, spec.image_format, spec.quality or DEFAULT_QUALITY)
        self.row_extra = row_extra or {}  # fields every manifest row of this run carries
        self.unsynced: list[str] = []
        self.lost: list[str] = []  # images whose manifest rows are not fsync'd yet
        self.batches = [Batch(items[i : i + batch]) for i in range(0, len(items), batch)]
        self.total = len(items)
        self.servers = [ServerState(u) for u in urls]
        self.concurrency = concurrency
        self.max_attempts = max_attempts
        self.server_wait = server_wait
        self.load_real = load_real
        self.on_progress = on_progress
        self.work: queue.Queue[Batch] = queue.Queue()
        self.results: queue.Queue[tuple[str, Batch, object]] = queue.Queue()
        self.stop = threading.Event()
        self.retries = 0
        self.discover = discover  # the fleet now (names resolved again), or None for a fixed list of servers
        self.rediscover_every = rediscover_every
        self.log = log or (lambda _msg: None)

    # -- workers --------------------------------------------------------------------------------------------

    def _worker(self, server: ServerState) -> None:
        """A request thread; if it dies of anything unexpected the job hears of it (it is never waited on)."""
        try:
            self._serve(server)
        except BaseException as exc:  # noqa: BLE001 - reported to the job loop, which stops with it
            if not self.stop.is_set():
                self.results.put(("crashed", Batch([]), f"{threading.current_thread().name}: {_one_line(exc)}"))

    def _serve(self, server: ServerState) -> None:
        client: PipelineClient | None = None
        while not self.stop.is_set() and not server.refused and not server.gone:
            if not server.healthy:
                if server_ready(server.url, timeout=1.0):
                    server.healthy = True
                    client = None
                else:
                    self.stop.wait(1.0)
                    continue
            try:
                batch = self.work.get(timeout=0.2)
            except queue.Empty:
                continue
            items, init_images, skipped = self._prepare(batch)
            if skipped:
                self.results.put(("skipped", Batch([it for it, _ in skipped]), skipped))
            if not items:
                continue
            try:
                if client is None:  # a new connection, perhaps to a restarted server: is it still the job's model?
                    client = PipelineClient(server.url)
                    card = client.card()
                    refusal = self._refusal(card)
                    if refusal:
                        server.refused, server.healthy = refusal, False
                        self.results.put(("refused", Batch(items, batch.attempts), f"{server.url}: {refusal}"))
                        return
                    server.engine = card.engine
                t0 = time.perf_counter()
                images = client.generate(self.spec, items, init_images)
                elapsed = time.perf_counter() - t0
            except Exception as exc:  # noqa: BLE001 - every failure is retried or reported, never lost
                client = None
                alive = server_ready(server.url, timeout=1.0)
                with server.lock:
                    server.failures += 1
                    if not alive:
                        server.healthy = False
                self.results.put(("failed", Batch(items, batch.attempts), f"{server.url}: {_one_line(exc)}"))
                if alive:  # the server answered but the request failed: back off before the next one
                    self.stop.wait(min(0.5 * 2**batch.attempts, 8.0))
                continue
            with server.lock:
                server.requests += 1
                server.busy_seconds += elapsed
            # encoding and writing run on the writer's pool: this thread goes back to its server at once
            rels = [image_relpath(item, self.width, self.suffix) for item in items]
            done = functools.partial(self._written, items, rels, server, server.engine)
            self.writer.write_batch(rels, images, done)

    def _written(self, items: list[WorkItem], rels: list[str], server: ServerState, engine, facts, error) -> None:
        """The writer finished a batch: its manifest rows go to the job loop, or the write error that stops it.
        Runs on a writer thread, so anything unexpected is reported rather than lost with the batch."""
        try:
            if error is not None:
                self.results.put(("fatal", Batch(items), error))
                return
            rows = [
                self._row(item, rel, f, server.url, engine) for item, rel, f in zip(items, rels, facts, strict=True)
            ]
            with server.lock:
                server.images += len(rows)
            self.results.put(("done", Batch(items), rows))
        except BaseException as exc:  # noqa: BLE001 - the job loop stops with it
            self.results.put(("crashed", Batch(items), f"writing a batch: {_one_line(exc)}"))

    def _refusal(self, card) -> str | None:
        """Why a server's model card does not fit this job (another model, or another engine), or None."""
        if self.spec.model is not None and card.identity != self.spec.model:
            return f"serves model {card.identity}, this job's is {self.spec.model}"
        if self.spec.engine not in (None, "mixed") and card.engine != self.spec.engine:
            return f"runs engine {card.engine!r}, this job's is {self.spec.engine!r} (see --mixed-engines)"
        return None

    def _prepare(self, batch: Batch) -> tuple[list[WorkItem], np.ndarray | None, list[tuple[WorkItem, str]]]:
        """Load the batch's real images; an image that does not decode is skipped (and reported), not retried."""
        if self.load_real is None or batch.items[0].real_image is None:
            return batch.items, None, []
        items, images, skipped = [], [], []
        for item in batch.items:
            try:
                images.append(self.load_real(item))
                items.append(item)
            except Exception as exc:  # noqa: BLE001 - a bad input file must not stop the job
                skipped.append((item, f"real image {item.real_image} does not decode ({_one_line(exc)})"))
        return items, (np.stack(images) if images else None), skipped

    def _row(self, item: WorkItem, rel: str, facts: dict, url: str, engine: str | None) -> dict:
        s = self.spec
        return {
            "path": rel,
            "class_index": item.cls.index,
            "class_id": item.cls.id,
            "class_name": item.cls.name,
            "index": item.index,
            "prompt": item.prompt,
            "negative_prompt": s.negative_prompt,
            "seed": item.seed,
            "steps": s.steps,
            "guidance_scale": s.guidance_scale,
            "strength": s.strength if item.real_image else None,
            "guidance_token": bool(s.guidance_token and item.real_image),
            "real_image": item.real_image,
            "caption": item.caption or None,
            "model": s.model,
            "engine": engine,  # as it was when the server made the image
            "server": url,
            "sha256": facts["sha256"],
            "size": facts["size"],
            "mtime_ns": facts["mtime_ns"],
            **self.row_extra,
        }

    # -- the job --------------------------------------------------------------------------------------------

    def _start_threads(self, server: ServerState, threads: list[threading.Thread]) -> None:
        server.threads = [
            threading.Thread(target=self._worker, args=(server,), daemon=True, name=f"rf-{server.url}-{k}")
            for k in range(self.concurrency)
        ]
        for t in server.threads:
            t.start()
        threads += server.threads

    def _discoverer(self) -> None:
        """Resolve the fleet again every `rediscover_every` seconds and tell the job loop what it is now."""
        try:
            while not self.stop.wait(self.rediscover_every):
                self.results.put(("fleet", Batch([]), self.discover()))
        except BaseException as exc:  # noqa: BLE001 - reported to the job loop, which stops with it
            if not self.stop.is_set():
                self.results.put(("crashed", Batch([]), f"server discovery: {_one_line(exc)}"))

    def _update_fleet(self, addresses: list[str], threads: list[threading.Thread]) -> None:
        """Servers that joined get request threads; servers that left are dropped (their requests in flight end as
        they end: a failure is retried on another server, as when a server dies)."""
        known = {s.url: s for s in self.servers}
        for url in addresses:
            server = known.get(url)
            if server is None:
                server = ServerState(url)
                self.servers.append(server)
                self.log(f"server {url} joined the fleet")
            elif not server.gone:
                continue
            else:
                server.gone, server.healthy = False, True
                self.log(f"server {url} is back in the fleet")
            if not any(t.is_alive() for t in server.threads):
                self._start_threads(server, threads)
        wanted = set(addresses)
        for server in self.servers:
            if server.url not in wanted and not server.gone:
                server.gone = True
                self.log(f"server {server.url} left the fleet")

    def run(self) -> Summary:
        for b in self.batches:
            self.work.put(b)
        threads: list[threading.Thread] = []
        start = time.perf_counter()
        for srv in list(self.servers):
            self._start_threads(srv, threads)
        if self.discover is not None:
            discoverer = threading.Thread(target=self._discoverer, daemon=True, name="rf-discovery")
            discoverer.start()
            threads.append(discoverer)
        done = failed = skipped = 0
        failures: list[dict] = []
        all_down_since: float | None = None
        try:
            while done + failed + skipped < self.total:
                try:
                    kind, batch, payload = self.results.get(timeout=0.5)
                except queue.Empty:
                    kind = None
                if kind == "done":
                    self._record(payload)
                    done += len(batch.items)
                elif kind == "fatal":  # a write error: every later image would fail the same way
                    raise UserError(
                        f"{payload}; {done} images finished and kept: fix that (space, permission, mount), "
                        "then re-run the same command to resume"
                    )
                elif kind == "crashed":
                    raise RuntimeError(f"a request thread died: {payload}")
                elif kind == "skipped":
                    skipped += len(batch.items)
                    failures += [
                        {
                            "path": image_relpath(i, self.width, self.suffix),
                            "real_image": i.real_image,
                            "error": reason,
                            "kind": "skipped",
                        }
                        for i, reason in payload
                    ]
                elif kind == "fleet":
                    self._update_fleet(payload, threads)
                elif kind == "refused":  # not the batch's fault: it goes back, uncounted
                    self.work.put(batch)
                    active = [srv for srv in self.servers if not srv.gone]
                    if active and all(srv.refused for srv in active):
                        raise UserError(
                            "no server fits this job: "
                            + "; ".join(f"{srv.url} {srv.refused}" for srv in self.servers)
                            + f"; {done} images finished and kept"
                        )
                elif kind == "failed":
                    batch.attempts += 1
                    batch.last_error = str(payload)
                    if batch.attempts >= self.max_attempts:
                        failed += len(batch.items)
                        failures += [
                            {"path": image_relpath(i, self.width, self.suffix), "error": batch.last_error}
                            for i in batch.items
                        ]
                    else:
                        self.retries += 1
                        self.work.put(batch)
                if any(s.healthy for s in self.servers if not s.refused and not s.gone):
                    all_down_since = None
                elif all_down_since is None:
                    all_down_since = time.monotonic()
                elif time.monotonic() - all_down_since > self.server_wait:
                    raise UserError(
                        f"no server reachable for {self.server_wait:.0f}s ({self._fleet_text()});"
                        f" {done} images finished and kept: re-run the same command to resume"
                    )
                if self.on_progress:
                    self.on_progress(done, failed + skipped, self._rates(time.perf_counter() - start))
        finally:
            self._wind_down(threads)
        wall = time.perf_counter() - start
        servers = [s.summary(wall) for s in self.servers]
        return Summary(done, 0, failed, self.retries, wall, servers, failures, skipped_real=skipped)

    def _record(self, rows: list[dict]) -> None:
        """A batch's manifest rows. The manifest failing to take them stops the job like an image write error; the
        rows it may not hold are remembered so their images go too (see `_wind_down`)."""
        for k, row in enumerate(rows):
            try:
                self.manifest.append(row)
            except OSError as exc:
                self.lost += [r["path"] for r in rows[k:]]
                raise UserError(
                    f"cannot write the manifest {self.manifest.path}: {exc.strerror or exc}; fix that, then re-run "
                    "the same command to resume"
                ) from None
            except BaseException:
                self.lost += [r["path"] for r in rows[k:]]
                raise
            self.unsynced.append(row["path"])
            if self.manifest.pending == 0:  # it was just fsync'd
                self.unsynced.clear()

    def _wind_down(self, threads: list[threading.Thread]) -> None:
        """Stop the request threads, let the images in flight land, and record them: on any path out of `run`,
        the manifest then lists exactly the images on disk (what `rf-client verify` checks)."""
        self.stop.set()
        deadline = time.monotonic() + 5.0  # a thread stuck in a request is left behind (daemon), never waited on
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.writer.close()  # a thread left behind can queue no more images after this
        lost = self.lost  # rows the manifest may not hold: their images go, so nothing is unlisted
        while True:
            try:
                kind, _, payload = self.results.get_nowait()
            except queue.Empty:
                break
            if kind != "done":
                continue
            for row in payload:
                if not lost:
                    try:
                        self.manifest.append(row)
                        self.unsynced.append(row["path"])
                        continue
                    except OSError:
                        pass
                lost.append(row["path"])
        try:
            self.manifest.sync()
            self.unsynced.clear()
        except OSError:
            lost += self.unsynced
        if lost:
            for rel in lost:
                (self.out / rel).unlink(missing_ok=True)
            with contextlib.suppress(OSError, UserError):  # with room again, drop rows whose image is gone
                self.manifest.close()
                compact_manifest(self.out, self.manifest.path.name)

    def _fleet_text(self) -> str:
        return ", ".join(s.url + (" (left)" if s.gone else "") for s in self.servers) or "no server in the fleet"

    def _rates(self, wall: float) -> dict:
        return {s.url: (s.images, s.images / wall if wall > 0 else 0.0, s.healthy and not s.gone) for s in self.servers}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def write_summary(out: Path, name: str, summary: Summary, extra: dict) -> Path:
    path = out / name
    write_atomic(path, json.dumps({**summary.to_json(), **extra}, indent=2).encode())
    return path
