"""`rf-client`: build labelled synthetic datasets against Triton servers; `rf-serve`: a local server."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from realfake.client.generate import GenerateConfig
from realfake.client.server_metrics import DEFAULT_METRICS_PORT
from realfake.core.classes import BUILTIN, load_classes
from realfake.core.cli import (
    Debug,
    GuidanceToken,
    ImageFormat,
    PartialCaptions,
    int_list,
    make_app,
    moved_to_out,
    run_cli,
)
from realfake.core.defaults import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_STEPS,
)
from realfake.core.errors import UserError
from realfake.core.images import FORMATS
from realfake.core.progress import ProgressLines, is_terminal

app = make_app("Build labelled synthetic image datasets (Real-Fake) against one or many Triton servers.")


@app.command()
def classes(
    set_name: Annotated[
        str,
        typer.Argument(
            metavar="SET", help=f"{', '.join(BUILTIN)}, a class file, or an ImageFolder (its folder names)."
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    debug: Debug = False,
) -> None:
    """List the classes of a class set: index, id (the dataset folder name), prompt name and source lemma."""
    rows = load_classes(set_name)
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in rows], indent=1))
        return
    for r in rows:
        typer.echo(f"{r.index}\t{r.id}\t{r.name}\t{r.lemma}")


@app.command()
def generate(
    classes: Annotated[
        str, typer.Option(help=f"Class set: {', '.join(BUILTIN)}, a class file, or an ImageFolder (its folder names).")
    ],
    out: Annotated[Path, typer.Option(help="Output directory (ImageFolder + manifest.jsonl).")],
    per_class: Annotated[
        int | None, typer.Option(help="Images per class (text-only mode); with --real: real images used per class.")
    ] = None,
    real: Annotated[
        Path | None, typer.Option(help="ImageFolder of real images: each yields --versions images conditioned on it.")
    ] = None,
    versions: Annotated[
        int, typer.Option(help="Synthetic images per real image (with --real).")
    ] = GenerateConfig.versions,
    strength: Annotated[
        float, typer.Option(help="Latent prior strength (with --real): 1.0 = from noise, lower = closer to the real.")
    ] = GenerateConfig.strength,
    captions: Annotated[
        Path | None, typer.Option(help='JSONL captions: {"image": <path or stem>, "caption": <text>} per line.')
    ] = None,
    partial_captions: PartialCaptions = False,
    guidance_token: Annotated[
        GuidanceToken,
        typer.Option(help="Image-embedding guidance token (with --real): auto (when the model has one), on, off."),
    ] = GenerateConfig.guidance_token,
    url: Annotated[
        list[str] | None,
        typer.Option(
            help="Triton server HOST:PORT (HTTP port); repeat for a fleet. A DNS name stands for every address it "
            "resolves to (e.g. a Kubernetes headless Service), resolved again while the job runs. Or --local."
        ),
    ] = None,
    local: Annotated[
        str | None,
        typer.Option(
            help="Serve the model here instead of --url: a Triton model repository, a diffusers bundle (exported "
            "once, cached), or `tiny` (random weights, for trying things out)."
        ),
    ] = None,
    image_format: Annotated[
        ImageFormat, typer.Option("--format", help="Image files: png (lossless), jpeg or webp.")
    ] = GenerateConfig.image_format,
    quality: Annotated[
        int, typer.Option(help="JPEG/WebP quality 1-100 (95: what ImageNet users expect); PNG ignores it.")
    ] = GenerateConfig.quality,
    seed: Annotated[
        int, typer.Option(help="Job seed: image seeds derive from (seed, class, index).")
    ] = GenerateConfig.seed,
    prompt_template: Annotated[
        str, typer.Option(help="Prompt with {class} and {caption}.")
    ] = GenerateConfig.prompt_template,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt.")] = GenerateConfig.negative_prompt,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = GenerateConfig.steps,
    guidance_scale: Annotated[
        float, typer.Option(help="Classifier-free guidance scale (<= 1 disables it).")
    ] = GenerateConfig.guidance_scale,
    batch_size: Annotated[
        int, typer.Option(help="Images per request (the server's dynamic batcher may join requests).")
    ] = GenerateConfig.batch_size,
    concurrency: Annotated[int, typer.Option(help="Requests in flight per server.")] = GenerateConfig.concurrency,
    shard: Annotated[str | None, typer.Option(help="I/N: make only this process's share of the job.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Resume even though the job's settings changed.")] = False,
    mixed_engines: Annotated[
        bool,
        typer.Option(
            "--mixed-engines",
            help="Accept servers whose engines differ (runtime, precision, plans, scheduler): each image then "
            "depends on the server that made it (recorded per manifest row).",
        ),
    ] = False,
    max_attempts: Annotated[
        int, typer.Option(help="Tries per request before its images count as failed.")
    ] = GenerateConfig.max_attempts,
    server_wait: Annotated[
        float, typer.Option(help="Seconds to wait for any server to come back (or for a --url name to resolve).")
    ] = GenerateConfig.server_wait,
    rediscover_every: Annotated[
        float, typer.Option(help="Seconds between resolving --url names again: servers join and leave the job.")
    ] = GenerateConfig.rediscover_every,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the options, read the classes and inputs, ask the servers (when given), print the plan "
            "(images, shards, already finished, disk per format) and exit: nothing is written.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
    debug: Debug = False,
) -> None:
    """Generate a labelled synthetic dataset: OUT/<class_id>/<index>.<png|jpg|webp> plus OUT/manifest.jsonl.

    Re-running the same command resumes: finished images are kept (trusted by size and mtime, hashed when the
    mtime differs), the rest are made.
    """
    from realfake.client.generate import generate_dataset

    cfg = GenerateConfig(
        classes=classes,
        out=out,
        per_class=per_class,
        real=real,
        versions=versions,
        strength=strength,
        captions=captions,
        partial_captions=partial_captions,
        guidance_token=guidance_token,
        seed=seed,
        prompt_template=prompt_template,
        negative_prompt=negative_prompt,
        steps=steps,
        guidance_scale=guidance_scale,
        urls=url or [],
        local=local,
        image_format=image_format,
        quality=quality,
        batch_size=batch_size,
        concurrency=concurrency,
        shard=shard,
        force=force,
        mixed_engines=mixed_engines,
        max_attempts=max_attempts,
        server_wait=server_wait,
        rediscover_every=rediscover_every,
    )
    log = (lambda *_: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    if dry_run:
        from realfake.client.plan import plan_dataset

        for line in plan_dataset(cfg, log=log).lines():
            typer.echo(line)
        return
    # a terminal gets the live bar; a log (no terminal, or --quiet) gets a plain line every RF_PROGRESS_EVERY s
    live = is_terminal() and not quiet
    bar = ProgressBar(disable=not live)
    with bar.progress:
        summary = generate_dataset(cfg, log=log, progress=bar.update if live else PlainProgress().update)
    typer.echo(
        f"{summary.images} images in {summary.wall_seconds:.1f}s ({summary.images_per_sec:.2f} images/sec), "
        f"{summary.skipped} already done, {summary.failed} failed, {summary.retries} retries -> {out} "
        f"(summary: {summary.path})"
    )
    if summary.skipped_real:
        typer.echo(
            f"warning: {summary.skipped_real} images skipped: their real image does not decode (see {summary.path})",
            err=True,
        )
    if summary.failed:
        raise UserError(f"{summary.failed} images failed (see {summary.path}); re-run the same command to retry them")


class PlainProgress:
    """Generation's progress as plain lines (done/total, rate, ETA, failures, servers up), for logs."""

    def __init__(self):
        self.lines: ProgressLines | None = None

    def update(self, done: int, failed: int, total: int, rates: dict) -> None:
        if self.lines is None:
            self.lines = ProgressLines("generate", total)
        up = sum(1 for _, _, healthy in rates.values() if healthy)
        self.lines.update(done, failed, extra=f"servers up {up}/{len(rates)}")


class ProgressBar:
    """A rich progress bar over the job (rate and ETA), with a line per server when there are several."""

    def __init__(self, disable: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            disable=disable,
            transient=False,
        )
        self.task = None
        self.server_tasks: dict[str, object] = {}

    def update(self, done: int, failed: int, total: int, rates: dict) -> None:
        if self.task is None:
            self.task = self.progress.add_task("generating", total=total, rate="")
        if len(rates) > 1:  # a line per server, also for servers that join while the job runs
            for u in rates:
                if u not in self.server_tasks:
                    self.server_tasks[u] = self.progress.add_task(f"  {u}", total=None, rate="")
        total_rate = sum(r[1] for r in rates.values())
        self.progress.update(self.task, completed=done + failed, rate=f"{total_rate:.2f} img/s")
        for u, (imgs, rate, healthy) in rates.items():
            if u in self.server_tasks:
                state = "" if healthy else " (down)"
                self.progress.update(self.server_tasks[u], completed=imgs, rate=f"{rate:.2f} img/s{state}")


@app.command()
def verify(
    dataset: Annotated[Path, typer.Argument(metavar="DATASET", help="An rf-client output directory.")],
    no_decode: Annotated[bool, typer.Option("--no-decode", help="Check hashes only, skip decoding.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
    debug: Debug = False,
) -> None:
    """Check a dataset: every manifest row has its image (same hash, decodes) and every image has one row.

    Exits 1 when anything is missing, damaged, duplicated or unlisted.
    """
    from realfake.client.verify import verify as run_verify

    report = run_verify(dataset, decode=not no_decode, progress=ProgressLines("verify", 0, unit="rows").update)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=1))
    else:
        counts = sorted(report.class_counts.values())
        spread = f"{counts[0]}..{counts[-1]} per class" if counts else "no classes"
        typer.echo(f"{dataset}: {report.rows} manifest rows, {report.images} images, {len(counts)} classes ({spread})")
        for label in ("missing", "undecodable", "hash_mismatch", "duplicate_rows", "unlisted"):
            items = getattr(report, label)
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                typer.echo(f"  {label.replace('_', ' ')}: {len(items)}: {', '.join(items[:5])}{more}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def merge(
    dataset: Annotated[
        Path, typer.Argument(metavar="DATASET", help="An rf-client output directory made by --shard I/N processes.")
    ],
    debug: Debug = False,
) -> None:
    """Fold the shards' manifests into DATASET/manifest.jsonl once every shard has finished (safe to run again
    after a crash), and write the loaders' files (classes.txt, class_to_idx.json, Hugging Face metadata.jsonl).
    `verify` and `pack` read either layout."""
    from realfake.core.dataset import merge_manifests

    if not dataset.is_dir():
        raise UserError(f"{dataset} is not a directory")
    rows, shards = merge_manifests(dataset, progress=ProgressLines("merge", 0, unit="rows").update)
    typer.echo(f"{rows} rows in {dataset / 'manifest.jsonl'} ({shards} shard manifests merged)")


@app.command()
def pack(
    dataset: Annotated[Path, typer.Argument(metavar="DATASET", help="A verified rf-client output directory.")],
    target: Annotated[Path | None, typer.Argument(hidden=True)] = None,  # the old positional TARGET
    out: Annotated[Path | None, typer.Option(help="Directory for the WebDataset shards.")] = None,
    shard_size: Annotated[int, typer.Option(help="Images per tar shard.")] = 1000,
    seed: Annotated[int, typer.Option(help="Seed of the shuffle across classes (the same seed, the same shards).")] = 0,
    debug: Debug = False,
) -> None:
    """Write a finished dataset as WebDataset tar shards: per image <key>.<png|jpg|webp> (the dataset's own
    files, not re-encoded), <key>.cls (the class set's index) and <key>.json (its manifest row). Samples are
    shuffled across classes (seeded), so each shard mixes the classes as a streaming loader needs."""
    from realfake.client.verify import pack_webdataset

    target = moved_to_out(target, out, "TARGET")
    shards = pack_webdataset(dataset, target, shard_size, seed, progress=ProgressLines("pack", 0).update)
    typer.echo(f"{len(shards)} shards written to {target}")


@app.command()
def bench(
    url: Annotated[list[str] | None, typer.Option(help="The server to measure, HOST:PORT (or --local).")] = None,
    local: Annotated[
        str | None,
        typer.Option(
            help="Serve the model here and measure it: a Triton model repository, a diffusers bundle, or `tiny` "
            "(random weights: a benchmark of a toy)."
        ),
    ] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated in-flight request counts.")] = "1,2,4",
    batch_sizes: Annotated[
        str, typer.Option(help="Comma-separated images per request, each measured at every concurrency.")
    ] = "1,4",
    requests: Annotated[int, typer.Option(help="Requests measured per setting.")] = 8,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = DEFAULT_STEPS,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = DEFAULT_GUIDANCE_SCALE,
    out: Annotated[Path, typer.Option(help="Results path stem: writes OUT.json and OUT.csv.")] = ...,
    image_format: Annotated[
        ImageFormat, typer.Option("--format", help="Image format of the client ceiling measured after the table.")
    ] = GenerateConfig.image_format,
    quality: Annotated[int, typer.Option(help="JPEG/WebP quality of the client ceiling.")] = GenerateConfig.quality,
    client_seconds: Annotated[
        float,
        typer.Option(help="Seconds measuring what this client process can write with no model (0: skip it)."),
    ] = 2.0,
    metrics_url: Annotated[
        str | None,
        typer.Option(
            help="The server's Triton metrics HOST:PORT, for where the time goes (queue, compute, each component); "
            "default: the --url host on port 8002. `none` skips it."
        ),
    ] = None,
    debug: Debug = False,
) -> None:
    """Measure images/sec and latency p50/p95/p99 per (concurrency, batch) against a server, with where the time
    goes on the server (from Triton's metrics: queue, pipeline compute, each component), then the client's own
    ceiling (encode, hash, write, manifest; no model), so you see whether the fleet or the client limits."""
    import contextlib

    from rich.console import Console
    from rich.table import Table

    from realfake.client.default_model import local_server
    from realfake.client.server_metrics import default_metrics_url, scrape
    from realfake.client.throughput import measure, write_results
    from realfake.client.triton import PipelineClient, normalise_url

    levels, batches = int_list(concurrency, "--concurrency"), int_list(batch_sizes, "--batch-sizes")
    for option, value in (("--requests", requests), ("--steps", steps)):
        if value < 1:
            raise UserError(f"{option} must be >= 1, got {value}")
    if bool(url) == bool(local):
        raise UserError(
            "say which server to measure: --url HOST:PORT of a running one, or --local DIR (a repository or a "
            "bundle served here), or --local tiny for the random-weight tiny model"
        )
    if url and len(url) > 1:
        raise UserError("bench measures one server: give --url once")
    console = Console(width=None if sys.stdout.isatty() else 140)  # logs and pipes get whole column headers
    say = lambda m: typer.echo(m, err=True)  # noqa: E731
    with contextlib.ExitStack() as stack:
        if url:
            target = normalise_url(url[0])
            metrics = metrics_url or default_metrics_url(target)
        else:
            server = stack.enter_context(local_server(local, log=say))
            target, metrics = server.url, metrics_url or server.metrics_url
        card = PipelineClient(target).card()
        if metrics.lower() == "none":
            metrics = None
        else:
            try:
                scrape(metrics)
            except UserError as exc:
                say(f"warning: {exc}; measuring without the server-side breakdown")
                metrics = None
        rows = []
        for b in batches:
            for c in levels:
                row = measure(target, c, b, requests, steps, guidance_scale, metrics_url=metrics)
                rows.append(row)
                console.print(f"concurrency {c} batch {b}: {row.images_per_sec:.2f} img/s, p50 {row.latency_p50_ms} ms")
    table = Table(
        title=f"rf-client bench: {target}, model {card.identity}, engine {card.engine}, {steps} steps, "
        f"guidance scale {guidance_scale}"
    )
    for col in ("concurrency", "batch", "images/s", "p50 ms", "p95 ms", "p99 ms", "errors"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r.concurrency),
            str(r.batch),
            f"{r.images_per_sec:.2f}",
            f"{r.latency_p50_ms:.1f}",
            f"{r.latency_p95_ms:.1f}",
            f"{r.latency_p99_ms:.1f}",
            str(r.errors),
        )
    console.print(table)
    if metrics:
        console.print(_time_table(rows, metrics))
    meta = {
        "url": target,
        "model": card.identity,
        "engine": card.engine,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "requests": requests,
    }
    if client_seconds > 0:
        ceiling = _client_ceiling(out, image_format, quality, card.image_size, client_seconds)
        best = max(r.images_per_sec for r in rows)
        typer.echo(
            f"client ceiling ({image_format}, {ceiling.workers} writer threads, {card.image_size} px, no model): "
            f"{ceiling.images_per_sec:.1f} images/sec; the best setting above used {best / ceiling.images_per_sec:.1%}"
            " of it"
        )
        meta["client_ceiling"] = asdict(ceiling)
    json_path, csv_path = write_results(rows, out, meta)
    typer.echo(f"results: {json_path} {csv_path}")


def _time_table(rows, metrics: str):
    """Where a request's time goes, per setting: the client's side, the server's queue, the pipeline's own
    compute, and each component model, in milliseconds per request (from the server's metrics)."""
    from rich.table import Table

    components = sorted({name for r in rows for name in (r.components_ms or {})})
    table = Table(
        title=f"where the time goes, ms per request (server metrics at {metrics}): latency = client + queue + "
        "pipeline + components"
    )
    for col in ("conc", "batch", "latency", "client", "queue", "pipeline", *components, "batched"):
        table.add_column(col, justify="right")
    for r in rows:
        if r.server_request_ms is None:
            continue
        own = r.server_compute_ms - sum((r.components_ms or {}).values())
        table.add_row(
            str(r.concurrency),
            str(r.batch),
            f"{r.latency_mean_ms:.0f}",
            f"{r.client_overhead_ms:.0f}",
            f"{r.server_queue_ms:.0f}",
            f"{max(own, 0.0):.0f}",
            *(f"{(r.components_ms or {}).get(name, 0.0):.0f}" for name in components),
            f"{r.server_batch:.1f}",
        )
    return table


def _client_ceiling(out: Path, image_format: str, quality: int, size: int, seconds: float):
    """What this process writes per second with no model, measured beside the results (the same disk)."""
    import tempfile

    from realfake.client.throughput import client_ceiling, textured_images

    if image_format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {image_format!r}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".rf-client-ceiling-", dir=out.parent) as tmp:
        return client_ceiling(Path(tmp), image_format, quality, None, textured_images(8, size), seconds)


@app.command()
def serve(
    repo: Annotated[
        str,
        typer.Option(
            help="The Triton model repository to serve (`rf-export repo`), or `tiny`: the random-weight tiny model "
            "(built on first use; its images are noise, for trying things out)."
        ),
    ],
    http_port: Annotated[int, typer.Option(help="HTTP port on --host (0: a free one, announced).")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port on --host (0: a free one).")] = 8001,
    metrics_port: Annotated[
        int, typer.Option(help="Triton's Prometheus metrics port (what `rf-client bench` reads server time from).")
    ] = DEFAULT_METRICS_PORT,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    triton_bin: Annotated[
        Path | None,
        typer.Option(
            help="The tritonserver to run (a full install, e.g. /opt/tritonserver/bin/tritonserver, with its "
            "backends/ beside bin/). Default: the first of nvidia-pytriton's (Python backend only), PATH's and "
            "/opt/tritonserver's that has every backend the repository needs."
        ),
    ] = None,
    debug: Debug = False,
) -> None:
    """Start a local Triton server on a model repository and keep it running until Ctrl-C (or SIGTERM/SIGHUP).
    A repository of TensorRT plans or native ONNX Runtime models needs a full Triton install (NGC's, or
    --triton-bin); pytriton's bundled server has only the Python backend, and such a repository is refused."""
    from realfake.client.default_model import local_repository
    from realfake.client.server import LocalServer

    repo = local_repository(repo, lambda m: typer.echo(m, err=True), option="--repo", bundles=False)
    with LocalServer(
        repo, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port, host=host, triton_bin=triton_bin
    ) as server:
        typer.echo(
            f"Triton ready: HTTP {server.url}, gRPC {server.host}:{server.grpc_port}, metrics {server.metrics_url}"
        )
        typer.echo(f"log: {server.log_path}; Ctrl-C to stop")
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            typer.echo("stopping")
            return
        raise UserError(f"{server.exit_reason()}; log: {server.log_path}")


serve_app = make_app("Start a local Triton server on a model repository.")
serve_app.command()(serve)


def main() -> None:
    run_cli(app, "rf-client")


def serve_main() -> None:
    run_cli(serve_app, "rf-serve", has_commands=False)


if __name__ == "__main__":
    main()
