"""What a job would do, without doing it: `rf-client generate --dry-run`.

`plan_dataset` runs the first steps of `generate_dataset` (check the options, read the classes, real images and
captions, ask the servers when given) and counts: images in the job, per shard, already finished in OUT, and the
disk they will take in each image format. It writes nothing and starts no server.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from realfake.client.discovery import Fleet
from realfake.client.generate import GenerateConfig, build_job, negotiate, read_inputs
from realfake.client.throughput import textured_images
from realfake.core import dataset as ds
from realfake.core.images import FORMATS, encode_image

# the image side assumed when no server says it (Stable Diffusion 1.5's native resolution)
ASSUMED_IMAGE_SIZE = 512
# photo-like test images encoded per format for the size estimate
ESTIMATE_SAMPLES = 2


@dataclass
class Plan:
    classes: int
    images: int  # in the whole job
    mode: str  # "text-only" or "real-conditioned"
    shard: tuple[int, int]  # (I, N)
    per_shard: list[int]  # images in each of the N shards
    finished: int  # of this shard's images, already in OUT's manifests
    image_size: int
    image_size_source: str  # "server" or "assumed"
    model: str | None  # the served model's identity, when a server was asked
    engine: str | None
    servers: list[str]  # the addresses asked (a --url name resolved)
    local: str | None
    image_format: str
    quality: int | None
    bytes_per_image: dict[str, int] = field(default_factory=dict)  # format -> estimated bytes per image

    @property
    def mine(self) -> int:
        return self.per_shard[self.shard[0]]

    @property
    def to_make(self) -> int:
        return self.mine - self.finished

    def estimate(self, image_format: str, images: int) -> int:
        return self.bytes_per_image[image_format] * images

    def to_json(self) -> dict:
        return {**asdict(self), "mine": self.mine, "to_make": self.to_make}

    def lines(self) -> list[str]:
        i, n = self.shard
        lines = [
            "dry run: nothing is written and no server is started",
            f"classes       {self.classes}",
            f"images        {self.images:,} ({self.mode})",
        ]
        if n > 1:
            lines.append(
                f"shard         {i}/{n}: {self.mine:,} images (the {n} shards hold {min(self.per_shard):,} to "
                f"{max(self.per_shard):,} each)"
            )
        lines.append(f"finished      {self.finished:,} of them already in OUT; {self.to_make:,} to make")
        if self.servers:
            lines.append(
                f"servers       {len(self.servers)}: {', '.join(self.servers[:8])}"
                + (" ..." if len(self.servers) > 8 else "")
            )
            lines.append(f"model         {self.model} on {self.engine}")
        elif self.local:
            lines.append(f"servers       none asked: --local {self.local} would be served here")
        else:
            lines.append("servers       none given: the model's facts are assumed")
        lines.append(f"image size    {self.image_size} px ({self.image_size_source})")
        for fmt in FORMATS:
            per = self.bytes_per_image[fmt]
            chosen = " <- --format" if fmt == self.image_format else ""
            q = f" q{self.quality}" if fmt != "png" and self.quality else ""
            lines.append(
                f"disk, {fmt + q:<8} ~{_size(per)}/image: {_size(self.estimate(fmt, self.to_make))} for this run, "
                f"{_size(self.estimate(fmt, self.images))} for the whole job{chosen}"
            )
        lines.append(
            "              (sizes from photo-like test images with grain: generated images often compress smaller)"
        )
        return lines


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def bytes_per_image(size: int, quality: int) -> dict[str, int]:
    """Mean encoded bytes of photo-like test images of side `size`, per format (generated images of real
    classes land near these; a flat or noisy class can be far off either way)."""
    images = textured_images(ESTIMATE_SAMPLES, size)
    return {fmt: int(sum(len(encode_image(im, fmt, quality)) for im in images) / len(images)) for fmt in FORMATS}


def plan_dataset(cfg: GenerateConfig, log: Callable[[str], None] = print) -> Plan:
    """The plan of the job `cfg` describes: options checked, inputs read, servers asked when `cfg.urls` are given
    (a name is resolved; the servers must agree on one model, as for the real run). Writes nothing."""
    cfg.check(need_servers=False)
    inputs = read_inputs(cfg)
    addresses: list[str] = []
    if cfg.urls:
        addresses = Fleet(cfg.urls).wait(cfg.server_wait, log)
        card = negotiate(addresses, cfg.mixed_engines, log)
        size, source, model, engine = card.image_size, "server", card.identity, card.engine
    else:
        from realfake.client.triton import ModelCard

        card = ModelCard("", "unknown", ASSUMED_IMAGE_SIZE, cfg.guidance_token == "on", 0)
        size, source, model, engine = ASSUMED_IMAGE_SIZE, "assumed: no server asked", None, None
    _spec, items = build_job(cfg, inputs, card, log)
    shard = ds.parse_shard(cfg.shard)
    per_shard = [0] * shard[1]
    mine = set()
    for it in items:
        k = ds.shard_of(it, shard[1]) if shard[1] > 1 else 0
        per_shard[k] += 1
        if k == shard[0]:
            mine.add(it.key)
    finished = 0
    if cfg.out.is_dir():
        done: set = set()
        for manifest in ds.manifest_files(cfg.out):
            done |= ds.manifest_keys(manifest)
        finished = len(mine & done)
    quality = cfg.quality if cfg.image_format != "png" else None
    return Plan(
        classes=len(inputs.classes),
        images=len(items),
        mode="real-conditioned" if cfg.real is not None else "text-only",
        shard=shard,
        per_shard=per_shard,
        finished=finished,
        image_size=size,
        image_size_source=source,
        model=model,
        engine=engine,
        servers=addresses,
        local=cfg.local,
        image_format=cfg.image_format,
        quality=quality,
        bytes_per_image=bytes_per_image(size, cfg.quality),
    )
