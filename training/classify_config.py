"""The settings of `rf-train classify`, said once: the CLI's defaults, the run record and the resume check read
them from here (no torch import, so `rf-train --help` stays quick)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from realfake.core.errors import UserError

MODELS = ("resnet50", "resnet18", "resnet-small")
# what a run directory holds; --fresh replaces all of it
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "result.json")
# settings a resumed run must share with the run it continues (workers, eval_every: free to change)
RESUME_KEYS = (
    "classes",
    "val",
    "val_labels",
    "devkit_classes",
    "synthetic",
    "real",
    "real_fraction",
    "model",
    "image_size",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "milestones",
    "gamma",
    "seed",
    "precision",
)


def default_workers() -> int:
    """Data-loading processes per training process: the cores this process may use, shared among the
    processes of its node (torchrun's LOCAL_WORLD_SIZE), at most 8; none on one core, where loading in the
    training process itself is faster."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return 0 if per_process <= 1 else min(8, per_process)


@dataclass
class ClassifyConfig:
    classes: str
    val: str | Path | Sequence[str | Path]  # [NAME=]DIR, one or more; the first one picks best.pt
    out: Path
    synthetic: Path | None = None
    real: Path | None = None
    real_fraction: float = 1.0
    model: str = "resnet50"
    image_size: int | None = None  # default: 32 for resnet-small, 224 otherwise
    epochs: int = 30
    batch_size: int = 128  # global: divided over DDP processes
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: str = "0.5,0.75"  # fractions of the epochs where the lr is multiplied by gamma
    gamma: float = 0.2
    workers: int | None = None  # None: default_workers()
    seed: int = 0
    precision: str = "auto"  # auto (realfake.core.precision: fp32 on the CPU), fp32, fp16, bf16
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)
    val_labels: Sequence[str | Path] = ()  # [NAME=]FILE: labels of a flat validation folder
    devkit_classes: Path | None = None  # ILSVRC2012_ID -> wnid, for the devkit's ground-truth file
    resume: bool = True  # False: replace the run in `out` instead of continuing it

    def __post_init__(self) -> None:
        self.val = tuple(str(v) for v in ([self.val] if isinstance(self.val, (str, Path)) else self.val))
        self.val_labels = tuple(str(v) for v in self.val_labels)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.synthetic is None and self.real is None:
            raise UserError("give --synthetic, --real, or both: there is nothing to train on")
        if not 0.0 <= self.real_fraction <= 1.0:
            raise UserError(f"--real-fraction must be in [0, 1], got {self.real_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")

    @property
    def size(self) -> int:
        return self.image_size or (32 if self.model == "resnet-small" else 224)

    def milestone_epochs(self) -> list[int]:
        try:
            fractions = [float(x) for x in self.milestones.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--milestones takes comma-separated fractions, got {self.milestones!r}") from None
        return sorted({max(1, round(f * self.epochs)) for f in fractions if 0 < f < 1})

    def record(self) -> dict:
        """The settings as plain JSON values (run records, and the comparison on resume)."""
        return json.loads(json.dumps(asdict(self), default=str))
