"""`rf-client`: build labelled synthetic datasets against Triton servers; `rf-serve`: a local server."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from realfake.core import dataset as ds
from realfake.core.classes import BUILTIN, load_classes
from realfake.core.cli import Debug, int_list, make_app, run_cli
from realfake.core.defaults import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NEGATIVE,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_TEMPLATE,
)
from realfake.core.errors import UserError
from realfake.core.files import file_sha256, write_atomic

app = make_app("Build labelled synthetic image datasets (Real-Fake) against one or many Triton servers.")


@app.command()
def classes(
    set_name: Annotated[str, typer.Argument(metavar="SET", help=f"{', '.join(BUILTIN)}, or a class file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    debug: Debug = False,
) -> None:
    """List the classes of a class set: index, id (the dataset folder name) and readable name."""
    rows = load_classes(set_name)
    if as_json:
        typer.echo(json.dumps([r.__dict__ for r in rows], indent=1))
        return
    for r in rows:
        typer.echo(f"{r.index}\t{r.id}\t{r.name}")


@contextlib.contextmanager
def servers_for(urls: list[str], log):
    """The given servers, or (with none) the embedded default: a local Triton on the tiny model."""
    from realfake.client.triton import normalise_url

    if urls:
        yield [normalise_url(u) for u in urls]
        return
    from realfake.client.default_model import ensure_default_repo
    from realfake.client.server import LocalServer

    repo = ensure_default_repo(log)
    log(f"starting a local Triton server on {repo}")
    with LocalServer(repo) as server:
        log(f"server ready at {server.url} (log: {server.log_path})")
        yield [server.url]


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {out} is not writable ({exc.strerror or exc})") from None


@app.command()
def generate(
    classes: Annotated[str, typer.Option(help=f"Class set: {', '.join(BUILTIN)}, or a class file.")],
    out: Annotated[Path, typer.Option(help="Output directory (ImageFolder + manifest.jsonl).")],
    per_class: Annotated[
        int | None, typer.Option(help="Images per class (text-only mode); with --real: real images used per class.")
    ] = None,
    real: Annotated[
        Path | None, typer.Option(help="ImageFolder of real images: each yields --versions images conditioned on it.")
    ] = None,
    versions: Annotated[int, typer.Option(help="Synthetic images per real image (with --real).")] = 1,
    strength: Annotated[
        float, typer.Option(help="Latent prior strength (with --real): 1.0 = from noise, lower = closer to the real.")
    ] = DEFAULT_STRENGTH,
    captions: Annotated[
        Path | None, typer.Option(help='JSONL captions: {"image": <path or stem>, "caption": <text>} per line.')
    ] = None,
    guidance_token: Annotated[
        str,
        typer.Option(help="Image-embedding guidance token (with --real): auto (when the model has one), on, off."),
    ] = "auto",
    url: Annotated[
        list[str] | None,
        typer.Option(help="Triton server HOST:PORT (HTTP); repeat for many. None: start a local server."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Job seed: image seeds derive from (seed, class, index).")] = 0,
    prompt_template: Annotated[str, typer.Option(help="Prompt with {class} and {caption}.")] = DEFAULT_TEMPLATE,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt.")] = DEFAULT_NEGATIVE,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = DEFAULT_STEPS,
    guidance_scale: Annotated[
        float,
        typer.Option("--guidance-scale", "--guidance", help="Classifier-free guidance scale (<= 1 disables it)."),
    ] = DEFAULT_GUIDANCE_SCALE,
    batch: Annotated[int, typer.Option(help="Images per request.")] = 4,
    concurrency: Annotated[int, typer.Option(help="Requests in flight per server.")] = 2,
    shard: Annotated[str | None, typer.Option(help="I/N: make only this process's share of the job.")] = None,
    force: Annotated[bool, typer.Option(help="Resume even though the job's settings changed.")] = False,
    mixed_engines: Annotated[
        bool,
        typer.Option(
            help="Accept servers whose engines differ (runtime, precision, plans, scheduler): each image then "
            "depends on the server that made it (recorded per manifest row)."
        ),
    ] = False,
    max_attempts: Annotated[int, typer.Option(help="Tries per request before its images count as failed.")] = 4,
    server_wait: Annotated[float, typer.Option(help="Seconds to wait for any server to come back.")] = 120.0,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    debug: Debug = False,
) -> None:
    """Generate a labelled synthetic dataset: OUT/<class_id>/<index>.png plus OUT/manifest.jsonl.

    Re-running the same command resumes: finished images are kept (checked by hash), the rest are made.
    """
    from realfake.client.triton import PipelineClient
    from realfake.core import real_folder
    from realfake.core.images import load_real_image

    class_list = load_classes(classes)
    if per_class is None and real is None:
        raise UserError("--per-class is required in text-only mode (without --real)")
    if per_class is not None and per_class < 1:
        raise UserError(f"--per-class must be >= 1, got {per_class}")
    if steps < 1 or batch < 1 or concurrency < 1 or max_attempts < 1 or versions < 1:
        raise UserError("--steps, --batch, --concurrency, --max-attempts and --versions must be >= 1")
    if not 0.0 < strength <= 1.0:
        raise UserError(f"--strength must be in (0, 1], got {strength}")
    if guidance_token not in ("auto", "on", "off"):
        raise UserError(f"--guidance-token must be auto, on or off, got {guidance_token!r}")
    shard_ix = ds.parse_shard(shard)
    caption_map = real_folder.load_captions(captions) if captions else {}
    real_map = real_folder.scan_real(real, class_list) if real else {}
    if real_map and per_class is not None:
        real_map = {k: v[:per_class] for k, v in real_map.items()}
    if caption_map and real_map:
        _check_captions(caption_map, real_map, captions)
    _check_writable(out)
    log = (lambda *_: None) if quiet else (lambda msg: typer.echo(msg, err=True))
    with servers_for(url or [], log) as urls:
        cards = []
        for u in urls:
            try:
                cards.append(PipelineClient(u).card())
            except UserError as exc:
                if len(urls) == 1:
                    raise
                log(f"warning: {exc}; going on without it until it answers")
        if not cards:
            raise UserError(f"none of the servers is usable: {', '.join(urls)}")
        identities = {c.identity for c in cards}
        if len(identities) > 1:
            raise UserError(f"the servers serve different models ({', '.join(sorted(identities))})")
        engines = {c.engine for c in cards}
        if len(engines) > 1 and not mixed_engines:
            raise UserError(
                f"the servers run the model on different engines ({'; '.join(sorted(engines))}): images would depend "
                "on the server that made them; use servers of one kind, or --mixed-engines to accept that"
            )
        card = cards[0]
        use_token = bool(real) and (guidance_token == "on" or (guidance_token == "auto" and card.has_image_encoder))
        if use_token and not card.has_image_encoder:
            raise UserError("--guidance-token on needs a model with an image encoder; this one has none")
        if real and use_token is False and guidance_token == "auto":
            log("the served model has no image encoder: generating without the guidance token")
        spec = ds.JobSpec(
            classes=[c.__dict__ for c in class_list],
            per_class=per_class if not real else max(len(v) for v in real_map.values()),
            seed=seed,
            prompt_template=prompt_template,
            negative_prompt=negative_prompt,
            steps=steps,
            guidance_scale=guidance_scale,
            strength=strength if real else None,
            guidance_token=use_token,
            versions=versions if real else 1,
            real=str(real.resolve()) if real else None,
            captions_digest=file_sha256(captions) if captions else None,
            model=card.identity,
            engine="mixed" if mixed_engines else card.engine,
        )
        _check_job(out, spec, force)
        if real:
            items = _real_items(class_list, real_map, caption_map, spec)
            size = card.image_size

            def load_real(item):
                return load_real_image(real / item.real_image, size)
        else:
            items = [
                ds.WorkItem(c, i, ds.image_seed(seed, c.id, i), ds.render_prompt(prompt_template, c.name))
                for c in class_list
                for i in range(per_class)
            ]
            load_real = None
        opts = RunOptions(urls, shard_ix, batch, concurrency, max_attempts, server_wait, quiet)
        _run(out, spec, items, opts, log, load_real)


def _real_items(class_list, real_map, caption_map, spec: ds.JobSpec) -> list[ds.WorkItem]:
    """Real image r of a class yields versions v = 0..V-1 as indices r*V + v, each with its own seed."""
    from realfake.core.real_folder import caption_for

    items = []
    for c in class_list:
        for r, rel in enumerate(real_map.get(c.id, [])):
            caption = caption_for(caption_map, rel)
            prompt = ds.render_prompt(spec.prompt_template, c.name, caption)
            for v in range(spec.versions):
                index = r * spec.versions + v
                items.append(ds.WorkItem(c, index, ds.image_seed(spec.seed, c.id, index), prompt, rel, caption))
    return items


def _check_captions(caption_map: dict, real_map: dict, path: Path) -> None:
    known = {rel for rels in real_map.values() for rel in rels}
    known |= {Path(rel).stem for rel in known}
    unknown = [k for k in caption_map if k not in known]
    if len(unknown) == len(caption_map):
        raise UserError(f"captions file {path} names none of the real images (e.g. {unknown[0]!r})")


def _check_job(out: Path, spec: ds.JobSpec, force: bool) -> None:
    path = out / ds.JOB_FILE
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            old = ds.JobSpec(**stored)
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); move it away to start a new job") from None
        changed = [k for k in old.differences(spec) if k in stored]  # what an older version did not record: new
        if changed and not force:
            raise UserError(
                f"{out} holds a job with other settings ({', '.join(changed)}): use another --out, "
                "or --force to resume with the new settings"
            )
    write_atomic(path, json.dumps(spec.to_json(), indent=1).encode())


@dataclass(frozen=True)
class RunOptions:
    """How a job is spread over servers and shards: nothing here changes which images are made."""

    urls: list[str]
    shard: tuple[int, int]  # (index, count)
    batch: int
    concurrency: int
    max_attempts: int
    server_wait: float
    quiet: bool


def _run(out: Path, spec: ds.JobSpec, items: list[ds.WorkItem], opts: RunOptions, log, load_real=None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from realfake.client.generate import Runner, write_summary

    width = ds.index_width(spec)
    mine = [it for it in items if opts.shard[1] == 1 or ds.shard_of(it, opts.shard[1]) == opts.shard[0]]
    name = ds.manifest_name(opts.shard)
    ds.remove_stale_temporaries(out, opts.shard)
    done = ds.compact_manifest(out, name)
    for other in ds.manifest_files(out):
        if other.name != name:
            done.update({(r["class_id"], int(r["index"])): r for r in ds.read_manifest_rows(other)})
    pending = [it for it in mine if it.key not in done]
    skipped = len(mine) - len(pending)
    if skipped:
        log(f"resuming: {skipped} of {len(mine)} images already finished")
    writer = ds.ManifestWriter(out / name)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        disable=opts.quiet,
        transient=False,
    )
    task = progress.add_task("generating", total=len(pending), rate="")
    server_tasks = (
        {u: progress.add_task(f"  {u}", total=None, rate="") for u in opts.urls} if len(opts.urls) > 1 else {}
    )

    def on_progress(n_done, n_failed, rates):
        total_rate = sum(r[1] for r in rates.values())
        progress.update(task, completed=n_done + n_failed, rate=f"{total_rate:.2f} img/s")
        for u, (imgs, rate, healthy) in rates.items():
            if u in server_tasks:
                state = "" if healthy else " (down)"
                progress.update(server_tasks[u], completed=imgs, rate=f"{rate:.2f} img/s{state}")

    runner = Runner(
        out,
        spec,
        pending,
        opts.urls,
        writer,
        batch=opts.batch,
        concurrency=opts.concurrency,
        max_attempts=opts.max_attempts,
        server_wait=opts.server_wait,
        load_real=load_real,
        on_progress=on_progress,
    )
    try:
        with progress:
            summary = runner.run()
    finally:
        writer.close()
    summary.skipped = skipped
    summary_name = "summary.json" if opts.shard[1] == 1 else f"summary.shard-{opts.shard[0]}-of-{opts.shard[1]}.json"
    path = write_summary(out, summary_name, summary, {"out": str(out), "index_width": width})
    typer.echo(
        f"{summary.images} images in {summary.wall_seconds:.1f}s ({summary.images_per_sec:.2f} images/sec), "
        f"{skipped} already done, {summary.failed} failed, {summary.retries} retries -> {out} (summary: {path})"
    )
    if summary.skipped_real:
        typer.echo(
            f"warning: {summary.skipped_real} images skipped: their real image does not decode (see {path})", err=True
        )
    if summary.failed:
        raise UserError(f"{summary.failed} images failed (see {path}); re-run the same command to retry them")


@app.command()
def verify(
    out: Annotated[Path, typer.Argument(help="An rf-client output directory.")],
    no_decode: Annotated[bool, typer.Option("--no-decode", help="Check hashes only, skip decoding.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full report as JSON.")] = False,
    debug: Debug = False,
) -> None:
    """Check a dataset: every manifest row has its image (same hash, decodes) and every image has one row.

    Exits 1 when anything is missing, damaged, duplicated or unlisted.
    """
    from realfake.client.verify import verify as run_verify

    report = run_verify(out, decode=not no_decode)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=1))
    else:
        counts = sorted(report.class_counts.values())
        spread = f"{counts[0]}..{counts[-1]} per class" if counts else "no classes"
        typer.echo(f"{out}: {report.rows} manifest rows, {report.images} images, {len(counts)} classes ({spread})")
        for label in ("missing", "undecodable", "hash_mismatch", "duplicate_rows", "unlisted"):
            items = getattr(report, label)
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                typer.echo(f"  {label.replace('_', ' ')}: {len(items)}: {', '.join(items[:5])}{more}")
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def pack(
    out: Annotated[Path, typer.Argument(help="A verified rf-client output directory.")],
    target: Annotated[Path, typer.Argument(help="Directory for the WebDataset shards.")],
    shard_size: Annotated[int, typer.Option(help="Images per tar shard.")] = 1000,
    debug: Debug = False,
) -> None:
    """Write a finished dataset as WebDataset tar shards (<key>.png, <key>.cls, <key>.json)."""
    from realfake.client.verify import pack_webdataset

    shards = pack_webdataset(out, target, shard_size)
    typer.echo(f"{len(shards)} shards written to {target}")


@app.command()
def bench(
    url: Annotated[list[str] | None, typer.Option(help="Server HOST:PORT; none: start the embedded default.")] = None,
    concurrency: Annotated[str, typer.Option(help="Comma-separated in-flight request counts.")] = "1,2,4",
    batch: Annotated[str, typer.Option(help="Comma-separated images per request.")] = "1,4",
    requests: Annotated[int, typer.Option(help="Requests measured per setting.")] = 8,
    steps: Annotated[int, typer.Option(help="Sampler steps.")] = DEFAULT_STEPS,
    guidance_scale: Annotated[
        float, typer.Option("--guidance-scale", "--guidance", help="Classifier-free guidance scale.")
    ] = DEFAULT_GUIDANCE_SCALE,
    out: Annotated[Path, typer.Option(help="Results path stem: writes STEM.json and STEM.csv.")] = Path("bench"),
    debug: Debug = False,
) -> None:
    """Measure images/sec and latency p50/p95/p99 per (concurrency, batch) against a server."""
    from rich.console import Console
    from rich.table import Table

    from realfake.client.throughput import measure, write_results
    from realfake.client.triton import PipelineClient

    levels, batches = int_list(concurrency, "--concurrency"), int_list(batch, "--batch")
    if requests < 1 or steps < 1:
        raise UserError("--requests and --steps must be >= 1")
    console = Console()
    with servers_for(url or [], lambda m: typer.echo(m, err=True)) as urls:
        card = PipelineClient(urls[0]).card()
        rows = []
        for b in batches:
            for c in levels:
                row = measure(urls[0], c, b, requests, steps, guidance_scale)
                rows.append(row)
                console.print(f"concurrency {c} batch {b}: {row.images_per_sec:.2f} img/s, p50 {row.latency_p50_ms} ms")
    table = Table(
        title=f"rf-client bench: {urls[0]}, model {card.identity}, engine {card.engine}, {steps} steps, "
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
    meta = {
        "url": urls[0],
        "model": card.identity,
        "engine": card.engine,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "requests": requests,
    }
    json_path, csv_path = write_results(rows, out, meta)
    typer.echo(f"results: {json_path} {csv_path}")


@app.command()
def serve(
    repo: Annotated[Path | None, typer.Option(help="Model repository (default: the embedded tiny model).")] = None,
    http_port: Annotated[int, typer.Option(help="HTTP port on 127.0.0.1.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port on 127.0.0.1.")] = 8001,
    host: Annotated[str, typer.Option(help="Address to bind (loopback by default).")] = "127.0.0.1",
    debug: Debug = False,
) -> None:
    """Start a local Triton server on a model repository and keep it running until Ctrl-C."""
    from realfake.client.default_model import ensure_default_repo
    from realfake.client.server import LocalServer

    repo = repo or ensure_default_repo(lambda m: typer.echo(m, err=True))
    with LocalServer(repo, http_port=http_port, grpc_port=grpc_port, host=host) as server:
        typer.echo(f"Triton ready: HTTP {server.host}:{server.http_port}, gRPC {server.host}:{server.grpc_port}")
        typer.echo(f"log: {server.log_path}; Ctrl-C to stop")
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(1.0)
        except KeyboardInterrupt:
            typer.echo("stopping")
            return
        raise UserError(f"Triton exited with code {server.process.returncode}; log: {server.log_path}")


def main() -> None:
    run_cli(app)


def serve_main() -> None:
    run_cli(lambda: typer.run(serve))


if __name__ == "__main__":
    main()
