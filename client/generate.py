"""Generate a labelled synthetic dataset: the Python API under `rf-client generate`, the demo and notebooks.

    from realfake.client.generate import GenerateConfig, generate_dataset

    summary = generate_dataset(GenerateConfig(classes="cifar10", out=Path("out/c10"), per_class=10,
                                              urls=["127.0.0.1:8000"]))

`generate_dataset` runs in numbered steps: 1. check the options; 2. read the class set, the real images and
their captions; 3. negotiate the servers (one model; one engine unless mixed engines are accepted); 4. build the
job (its settings and work items) and compare it with the job stored in OUT, so a re-run resumes; 5. run the
work on the servers and write the summary. Re-running the same configuration resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from realfake.client.discovery import Fleet
from realfake.client.runner import Runner, Summary, write_summary
from realfake.client.triton import ModelCard, PipelineClient, normalise_url
from realfake.core import dataset as ds
from realfake.core.classes import ClassInfo, load_classes
from realfake.core.defaults import (
    ADD_IMAGE_ENCODER,
    DEFAULT_FORMAT,
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NEGATIVE,
    DEFAULT_QUALITY,
    DEFAULT_STEPS,
    DEFAULT_STRENGTH,
    DEFAULT_TEMPLATE,
    GUIDANCE_TOKEN_MODES,
)
from realfake.core.errors import UserError
from realfake.core.files import file_sha256, write_atomic
from realfake.core.images import FORMATS, check_decodes, load_real_image
from realfake.core.protocol import denoising_steps
from realfake.core.real_folder import caption_for, check_caption_coverage, load_captions, scan_real

# (images done, images failed or skipped, images to make in this run, per-server (images, images/s, healthy))
ProgressCallback = Callable[[int, int, int, dict], None]


@dataclass
class GenerateConfig:
    """One dataset job. The fields above `urls` decide which images are made (stored in OUT/job.json and
    compared on resume); the rest only decide how the work is spread and retried."""

    classes: str  # a built-in class set, a class file or an ImageFolder (see realfake.core.classes)
    out: Path
    per_class: int | None = None  # text-only mode: images per class; with `real`: real images used per class
    real: Path | None = None  # ImageFolder of real images: each yields `versions` images conditioned on it
    versions: int = 1
    strength: float = DEFAULT_STRENGTH  # latent prior strength (with `real`)
    captions: Path | None = None  # JSONL {"image": <path or stem>, "caption": <text>}
    partial_captions: bool = False  # accept a captions file that covers only some real images
    guidance_token: str = "auto"  # auto (when the served model has an image encoder), on, off
    seed: int = 0
    prompt_template: str = DEFAULT_TEMPLATE
    negative_prompt: str = DEFAULT_NEGATIVE
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    image_format: str = DEFAULT_FORMAT  # png, jpeg or webp
    quality: int = DEFAULT_QUALITY  # jpeg/webp quality, 1-100 (png ignores it)
    urls: list[str] = field(default_factory=list)  # Triton HTTP HOST:PORT of running servers
    local: str | None = None  # or a model served here: "tiny", a model repository or a diffusers bundle
    batch_size: int = 4  # images per request
    concurrency: int = 2
    shard: str | None = None  # "I/N": only this process's share
    force: bool = False  # resume even though the job's settings changed
    mixed_engines: bool = False
    max_attempts: int = 4
    server_wait: float = 120.0
    rediscover_every: float = 10.0  # seconds between resolving --url names again (servers join and leave)

    def check(self, need_servers: bool = True) -> None:
        """One UserError naming the first option that is out of range."""
        if self.per_class is None and self.real is None:
            raise UserError("--per-class is required in text-only mode (without --real)")
        if self.per_class is not None and self.per_class < 1:
            raise UserError(f"--per-class must be >= 1, got {self.per_class}")
        for option, value in (
            ("--steps", self.steps),
            ("--batch-size", self.batch_size),
            ("--concurrency", self.concurrency),
            ("--max-attempts", self.max_attempts),
            ("--versions", self.versions),
        ):
            if value < 1:
                raise UserError(f"{option} must be >= 1, got {value}")
        if not 0.0 < self.strength <= 1.0:
            raise UserError(f"--strength must be in (0, 1], got {self.strength}")
        if self.real is not None and self.strength < 1.0 and denoising_steps(self.steps, self.strength) < 1:
            raise UserError(
                f"--steps {self.steps} with --strength {self.strength} leaves no step to denoise: the latent prior "
                f"runs int(steps x strength) = {denoising_steps(self.steps, self.strength)} steps; raise --steps to "
                f"at least {math.ceil(1 / self.strength)} or --strength to at least {1 / self.steps:g}"
            )
        if self.guidance_token not in GUIDANCE_TOKEN_MODES:
            raise UserError(f"--guidance-token must be auto, on or off, got {self.guidance_token!r}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise UserError(f"--guidance-scale must be a finite number >= 0, got {self.guidance_scale}")
        if self.image_format not in FORMATS:
            raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {self.image_format!r}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be in 1..100, got {self.quality}")
        ds.parse_shard(self.shard)
        if self.rediscover_every <= 0:
            raise UserError(f"--rediscover-every must be > 0 seconds, got {self.rediscover_every}")
        if need_servers and not self.urls and not self.local:
            raise UserError(
                "say which model makes the images: --url HOST:PORT of a running Triton server (repeat it for a "
                "fleet), or --local DIR to serve a model repository or diffusers bundle here, or --local tiny for "
                "the random-weight tiny model (for trying things out; its images are noise)"
            )
        if self.urls and self.local:
            raise UserError("--url and --local exclude each other: use running servers, or one served here")
        for url in self.urls:
            normalise_url(url)


@dataclass
class Inputs:
    """What the job reads before any server is asked: classes, real images by class, captions."""

    classes: list[ClassInfo]
    real: dict[str, list[str]]  # class id -> image paths relative to the real root
    captions: dict[str, str]


def read_inputs(cfg: GenerateConfig, log: Callable[[str], None] = print) -> Inputs:
    class_list = load_classes(cfg.classes)
    captions = load_captions(cfg.captions) if cfg.captions else {}
    real = scan_real(cfg.real, class_list) if cfg.real else {}
    if real and cfg.per_class is not None:
        real = {k: v[: cfg.per_class] for k, v in real.items()}
    if captions and real:
        check_caption_coverage(captions, real, cfg.captions, cfg.partial_captions, log)
    if real:
        _check_some_real_image_decodes(cfg.real, real)
    return Inputs(class_list, real, captions)


def _check_some_real_image_decodes(root: Path, real: dict[str, list[str]]) -> None:
    """A job whose real images all fail to decode could make nothing: refuse it before any request. Stops at
    the first image that decodes, so a healthy folder costs one decode."""
    reasons = []
    for rels in real.values():
        for rel in rels:
            reason = check_decodes(root / rel)
            if reason is None:
                return
            reasons.append(f"{rel}: {reason}")
    raise UserError(f"--real {root}: none of its {len(reasons)} images decodes (e.g. {reasons[0]})")


def negotiate(urls: list[str], mixed_engines: bool = False, log: Callable[[str], None] = print) -> ModelCard:
    """The model card the servers agree on: one model, and one engine unless `mixed_engines`. A server that
    does not answer is skipped with a warning (the job's failover retries it) unless it is the only one."""
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
    return cards[0]


def build_job(
    cfg: GenerateConfig, inputs: Inputs, card: ModelCard, log: Callable[[str], None] = print
) -> tuple[ds.JobSpec, list[ds.WorkItem]]:
    """The job's settings (what decides the images) and its work items, one per image."""
    conditioned = cfg.real is not None
    token = cfg.guidance_token
    use_token = conditioned and (token == "on" or (token == "auto" and card.has_image_encoder))
    if use_token and not card.has_image_encoder:
        raise UserError("--guidance-token on needs a model with an image encoder; this one has none")
    if conditioned and token == "auto" and card.trained_with_guidance_token and not card.has_image_encoder:
        raise UserError(
            "the served model was finetuned with the guidance token but is served without an image encoder: "
            "export its bundle with image_encoder/ in it, or pass --guidance-token off to generate without it"
        )
    if conditioned and not use_token and token == "auto":
        raise UserError(
            "the served model has no image encoder, so Real-Fake mode would generate without the guidance token "
            f"(the method's core): give its bundle one (`{ADD_IMAGE_ENCODER}`), finetune and export that, or pass "
            "--guidance-token off to generate without it"
        )
    spec = ds.JobSpec(
        classes=[c.__dict__ for c in inputs.classes],
        per_class=max(len(v) for v in inputs.real.values()) if conditioned else cfg.per_class,
        seed=cfg.seed,
        prompt_template=cfg.prompt_template,
        negative_prompt=cfg.negative_prompt,
        steps=cfg.steps,
        guidance_scale=cfg.guidance_scale,
        strength=cfg.strength if conditioned else None,
        guidance_token=use_token,
        versions=cfg.versions if conditioned else 1,
        real=str(cfg.real.resolve()) if conditioned else None,
        captions_digest=file_sha256(cfg.captions) if cfg.captions else None,
        model=card.identity,
        engine="mixed" if cfg.mixed_engines else card.engine,
        image_format=cfg.image_format,
        quality=cfg.quality if cfg.image_format != "png" else None,
    )
    if conditioned:
        return spec, _real_items(inputs, spec)
    items = [
        ds.WorkItem(c, i, ds.image_seed(cfg.seed, c.id, i), ds.render_prompt(cfg.prompt_template, c.name))
        for c in inputs.classes
        for i in range(cfg.per_class)
    ]
    return spec, items


def _real_items(inputs: Inputs, spec: ds.JobSpec) -> list[ds.WorkItem]:
    """Real image r of a class yields versions v = 0..V-1 as indices r*V + v, each with its own seed."""
    items = []
    for c in inputs.classes:
        for r, rel in enumerate(inputs.real.get(c.id, [])):
            caption = caption_for(inputs.captions, rel)
            prompt = ds.render_prompt(spec.prompt_template, c.name, caption)
            for v in range(spec.versions):
                index = r * spec.versions + v
                items.append(ds.WorkItem(c, index, ds.image_seed(spec.seed, c.id, index), prompt, rel, caption))
    return items


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{time.time_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory {out} is not writable ({exc.strerror or exc})") from None


def store_job(out: Path, spec: ds.JobSpec, force: bool) -> None:
    """Write OUT/job.json; a stored job with other settings is refused unless `force` (resume with new ones)."""
    path = out / ds.JOB_FILE
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            old = ds.JobSpec(**stored)
        except (json.JSONDecodeError, TypeError) as exc:
            raise UserError(f"{path} is unreadable ({exc}); move it away to start a new job") from None
        # what an older version did not record is new, except the format: older jobs were all PNG
        changed = [k for k in old.differences(spec) if k in stored or k in ("image_format", "quality")]
        if changed and not force:
            raise UserError(
                f"{out} holds a job with other settings ({', '.join(changed)}): use another --out, "
                "or --force to resume with the new settings"
            )
    write_atomic(path, json.dumps(spec.to_json(), indent=1).encode())


def run_job(
    cfg: GenerateConfig,
    spec: ds.JobSpec,
    items: list[ds.WorkItem],
    urls: list[str],
    image_size: int,
    log: Callable[[str], None] = print,
    progress: ProgressCallback | None = None,
    discover: Callable[[], list[str]] | None = None,
) -> Summary:
    """Make this shard's unfinished items on `urls`, append the manifest, write the summary (Summary.path).
    With `discover` (the fleet's addresses now), servers that join or leave while the job runs are followed."""
    out, shard = cfg.out, ds.parse_shard(cfg.shard)
    mine = [it for it in items if shard[1] == 1 or ds.shard_of(it, shard[1]) == shard[0]]
    name = ds.manifest_name(shard)
    ds.remove_stale_temporaries(out, shard)
    done = ds.compact_manifest(out, name)
    for other in ds.manifest_files(out):
        if other.name != name:
            done |= ds.manifest_keys(other)
    pending = [it for it in mine if it.key not in done]
    skipped = len(mine) - len(pending)
    if skipped:
        log(f"resuming: {skipped} of {len(mine)} images already finished")
    load_real = None
    if cfg.real is not None:
        real_root = cfg.real

        def load_real(item: ds.WorkItem):
            return load_real_image(real_root / item.real_image, image_size)

    writer = ds.ManifestWriter(out / name)
    runner = Runner(
        out,
        spec,
        pending,
        urls,
        writer,
        batch=cfg.batch_size,
        concurrency=cfg.concurrency,
        max_attempts=cfg.max_attempts,
        server_wait=cfg.server_wait,
        load_real=load_real,
        on_progress=(lambda d, f, rates: progress(d, f, len(pending), rates)) if progress else None,
        row_extra={"local_model": cfg.local},
        discover=discover,
        rediscover_every=cfg.rediscover_every,
        log=log,
    )
    try:
        summary = runner.run()
    except BaseException:
        with contextlib.suppress(OSError):  # a full disk fails this too: the error that stopped the job is the news
            writer.close()
        raise
    writer.close()
    if shard[1] == 1:  # a sharded job's loader files come from `rf-client merge`, once every shard is done
        note = ds.write_loader_files(out)
        if note:
            log(f"note: {note}")
    summary.skipped = skipped
    summary_name = "summary.json" if shard[1] == 1 else f"summary.shard-{shard[0]}-of-{shard[1]}.json"
    extra = {"out": str(out), "index_width": ds.index_width(spec), "local_model": cfg.local}
    summary.path = write_summary(out, summary_name, summary, extra)
    return summary


def generate_dataset(
    cfg: GenerateConfig, log: Callable[[str], None] = print, progress: ProgressCallback | None = None
) -> Summary:
    """Make (or finish) the dataset `cfg` describes: OUT/<class_id>/<index>.<png|jpg|webp>, OUT/manifest.jsonl
    (one row per image), OUT/job.json and OUT/summary.json. The images come from the servers at `cfg.urls`, or
    from a local Triton serving `cfg.local` (the tiny model, a repository, or a bundle) for the job.

    Returns the summary; images that failed every attempt are counted in `summary.failed` (a re-run retries
    them). Bad options, inputs or servers, and any error writing an image or the manifest, raise UserError
    (nothing finished is lost: the same call then resumes)."""
    from realfake.client.default_model import serving_urls

    # 1. the options
    cfg.check()
    # 2. classes, real images, captions
    inputs = read_inputs(cfg, log)
    check_writable(cfg.out)
    with serving_urls(cfg.urls, log, local=cfg.local) as given:
        # 3. the servers (a --url name stands for every address it resolves to): one model, one engine
        fleet = Fleet(given)
        urls = fleet.wait(cfg.server_wait, log) if fleet.dynamic else fleet.urls
        card = negotiate(urls, cfg.mixed_engines, log)
        # 4. the job, compared with the one stored in OUT
        spec, items = build_job(cfg, inputs, card, log)
        store_job(cfg.out, spec, cfg.force)
        # 5. the work
        discover = fleet.addresses if fleet.dynamic else None
        return run_job(cfg, spec, items, urls, card.image_size, log, progress, discover)
