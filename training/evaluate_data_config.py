"""The settings of `rf-train evaluate-data`, named once (the CLI's defaults read them), without importing torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from realfake.core.errors import UserError


@dataclass
class EvaluateDataConfig:
    real: Path  # real ImageFolder
    synthetic: Path  # rf-client output (manifest) or an ImageFolder
    out: Path  # report directory
    classes: str
    bundle: Path | None = None  # features: the bundle's CLIP image encoder
    classifier: Path | None = None  # features: an `rf-train classify` checkpoint (best.pt), head removed
    torchvision: str | None = None  # features: a torchvision model by name ...
    weights: Path | None = None  # ... with its weights from this local file
    per_class: int | None = None  # at most this many images per class of each set (the first by path)
    nearest_k: int = 5  # k of precision/recall/density/coverage (the prdc paper's default)
    prdc_max: int = 10000  # overall PRDC on at most this many images per set (it needs all pairwise distances)
    kid_subsets: int = 100  # KID: subsets of min(1000, set sizes) images
    # cosine distance (on features centred at the real mean) under which a synthetic image counts as a copy;
    # 0.05 is a cosine similarity of 0.95, where CLIP embeddings of a resized or re-encoded image sit
    copy_threshold: float = 0.05
    worst_pairs: int = 16  # closest synthetic-real pairs drawn side by side in near_copies.png
    batch_size: int = 64
    seed: int = 0
    workers: int | None = None  # image-decoding threads

    def validate(self) -> None:
        sources = [s for s in (self.bundle, self.classifier, self.torchvision) if s]
        if len(sources) != 1:
            raise UserError(
                "give exactly one feature encoder: --bundle DIR, --classifier best.pt, "
                "or --torchvision NAME --weights FILE"
            )
        if bool(self.torchvision) != bool(self.weights):
            raise UserError("--torchvision NAME and --weights FILE go together (weights are never downloaded)")
        if not 0 < self.copy_threshold < 2:
            raise UserError(f"--copy-threshold is a cosine distance in (0, 2), got {self.copy_threshold}")
        if min(self.nearest_k, self.batch_size, self.kid_subsets, self.prdc_max) < 1 or self.worst_pairs < 0:
            raise UserError("--nearest-k, --batch-size, --kid-subsets and --prdc-max must be >= 1")
