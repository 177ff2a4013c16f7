"""The settings of `rf-train classify`, said once: the CLI's defaults, the recipes, the run record and the resume
check read them from here (no torch or timm import, so `rf-train --help` stays quick).

A recipe (`--recipe`) is a named set of settings from a known source; a setting given explicitly overrides it,
and whatever neither says comes from DEFAULTS. `--batch-size` is per process, as torchrun's and timm's
`train.py` count it: N processes train on N x batch images a step."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from realfake.core.errors import UserError

SMALL_MODEL = "resnet-small"  # ours, for 28-32 px inputs; every other --model is a timm model name
LR_SCHEDULES = ("multistep", "cosine")
INTERPOLATIONS = ("bilinear", "bicubic", "random")  # random: bilinear or bicubic per image (timm's training crop)
# what a run directory holds; --fresh replaces all of it
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "result.json")

# The settings a recipe may set, with the values a run takes when neither the command nor its recipe says.
DEFAULTS = {
    "model": "resnet50",
    "epochs": 30,
    "batch_size": 128,  # per process
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "multistep",
    # fractions of the epochs after which a multistep schedule multiplies the rate by gamma (0.5 of 30: epochs 1-15
    # at lr, 16-22 at lr x gamma, as torch's MultiStepLR counts)
    "milestones": "0.5,0.75",
    "gamma": 0.2,
    "lr_warmup_epochs": 0,  # epochs of linear warmup from warmup_lr to lr
    "warmup_lr": 1e-5,
    "label_smoothing": 0.0,
    "mixup": 0.0,  # mixup alpha (0: off)
    "cutmix": 0.0,  # cutmix alpha (0: off); with both, each batch takes one of them at even odds
    "color_jitter": 0.0,
    "interpolation": "bilinear",  # of the training crop
    "eval_interpolation": "bilinear",
    "eval_crop": 0.875,  # validation: resize to size / eval_crop, centre crop size (224 of 256)
}


@dataclass(frozen=True)
class Recipe:
    name: str
    source: str
    settings: dict
    processes: int  # how many processes its source trained with (its global batch: processes x batch_size)


RECIPES = {
    r.name: r
    for r in (
        Recipe(
            "realfake-reference",
            "the paper's code (BAAI-DCAI/Training-Data-Synthesis): train.sh on 4 GPUs with train.py's defaults "
            "(timm's train.py as it shipped)",
            {
                "model": "resnet50",
                "epochs": 200,
                "batch_size": 128,
                "lr": 0.1,
                "momentum": 0.9,
                "weight_decay": 5e-4,
                "lr_schedule": "multistep",
                # timm's decay milestones 50, 100, 150, which timm applies from the 50th, 100th and 150th epoch:
                # after 49, 99 and 149 epochs of 200
                "milestones": "0.245,0.495,0.745",
                "gamma": 0.2,
                "lr_warmup_epochs": 5,
                "warmup_lr": 1e-5,
                "label_smoothing": 0.1,
                "mixup": 0.0,
                "cutmix": 0.0,
                "color_jitter": 0.4,
                "interpolation": "random",
                "eval_interpolation": "bicubic",  # timm resnet50's default config: crop 0.95, bicubic
                "eval_crop": 0.95,
            },
            processes=4,
        ),
        Recipe(
            "torchvision-resnet50",
            "torchvision's classification reference for ResNet-50 (references/classification: 8 GPUs x 32, "
            "90 epochs, lr 0.1 x0.1 every 30 epochs, weight decay 1e-4)",
            {
                "model": "resnet50",
                "epochs": 90,
                "batch_size": 32,
                "lr": 0.1,
                "momentum": 0.9,
                "weight_decay": 1e-4,
                "lr_schedule": "multistep",
                "milestones": "0.3333,0.6667",  # after 30 and 60 epochs of 90 (StepLR(step_size=30))
                "gamma": 0.1,
                "lr_warmup_epochs": 0,
                "warmup_lr": 1e-5,
                "label_smoothing": 0.0,
                "mixup": 0.0,
                "cutmix": 0.0,
                "color_jitter": 0.0,
                "interpolation": "bilinear",
                "eval_interpolation": "bilinear",
                "eval_crop": 0.875,
            },
            processes=8,
        ),
    )
}
assert all(r.settings.keys() == DEFAULTS.keys() for r in RECIPES.values())

# settings a resumed run must share with the run it continues (workers, eval_every: free to change)
RESUME_KEYS = (
    "classes",
    "val",
    "val_labels",
    "devkit_classes",
    "synthetic",
    "versions",
    "real",
    "real_fraction",
    *DEFAULTS,
    "image_size",
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


@dataclass(frozen=True)
class Augment:
    """How images become tensors: the training crop's and the validation crop's settings."""

    color_jitter: float = DEFAULTS["color_jitter"]
    interpolation: str = DEFAULTS["interpolation"]
    eval_interpolation: str = DEFAULTS["eval_interpolation"]
    eval_crop: float = DEFAULTS["eval_crop"]

    @classmethod
    def of(cls, record: dict) -> Augment:
        """From a run record (a checkpoint's config); settings it lacks take their defaults."""
        return cls(**{f.name: record[f.name] for f in fields(cls) if record.get(f.name) is not None})


@dataclass
class ClassifyConfig:
    classes: str
    val: str | Path | Sequence[str | Path]  # [NAME=]DIR, one or more; the first one picks best.pt
    out: Path
    synthetic: Path | None = None
    # the first K versions of each real image of --synthetic (1x, 2x, ... of one job); None: all. The epochs stay
    # the same, so K versions train K times the steps: more data trained as long per image, as the paper scaled
    versions: int | None = None
    real: Path | None = None
    real_fraction: float = 1.0
    recipe: str | None = None  # a RECIPES name: its settings, under the ones given here
    # None below: the recipe's value, or DEFAULTS' (resolved in __post_init__)
    model: str | None = None  # resnet-small, or any timm model name
    image_size: int | None = None  # default: 32 for resnet-small, 224 otherwise
    epochs: int | None = None
    batch_size: int | None = None  # per process
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    lr_schedule: str | None = None
    milestones: str | None = None
    gamma: float | None = None
    lr_warmup_epochs: int | None = None
    warmup_lr: float | None = None
    label_smoothing: float | None = None
    mixup: float | None = None
    cutmix: float | None = None
    color_jitter: float | None = None
    interpolation: str | None = None
    eval_interpolation: str | None = None
    eval_crop: float | None = None
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
        if self.recipe is not None and self.recipe not in RECIPES:
            raise UserError(f"unknown recipe {self.recipe!r}: choose one of {', '.join(RECIPES)}")
        base = RECIPES[self.recipe].settings if self.recipe else DEFAULTS
        for key, value in base.items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def validate(self) -> None:
        check_model(self.model)
        if self.synthetic is None and self.real is None:
            raise UserError("give --synthetic, --real, or both: there is nothing to train on")
        if self.versions is not None and (self.versions < 1 or self.synthetic is None):
            raise UserError("--versions takes K >= 1 and selects from --synthetic")
        if not 0.0 <= self.real_fraction <= 1.0:
            raise UserError(f"--real-fraction must be in [0, 1], got {self.real_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("--epochs and --batch-size must be >= 1 and --lr > 0")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UserError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.lr_warmup_epochs < self.epochs:
            raise UserError(f"--lr-warmup-epochs must be in [0, --epochs), got {self.lr_warmup_epochs}")
        if not 0.0 <= self.label_smoothing < 1.0 or self.mixup < 0 or self.cutmix < 0 or self.color_jitter < 0:
            raise UserError("--label-smoothing must be in [0, 1), --mixup, --cutmix and --color-jitter >= 0")
        if not 0.0 < self.eval_crop <= 1.0:
            raise UserError(f"--eval-crop must be in (0, 1], got {self.eval_crop}")
        for name in ("interpolation", "eval_interpolation"):
            allowed = INTERPOLATIONS if name == "interpolation" else INTERPOLATIONS[:2]
            if getattr(self, name) not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        self.milestone_epochs()

    @property
    def size(self) -> int:
        return self.image_size or (32 if self.model == SMALL_MODEL else 224)

    @property
    def augment(self) -> Augment:
        return Augment.of(asdict(self))

    def milestone_epochs(self) -> list[int]:
        """How many epochs have finished when each decay takes effect."""
        try:
            fractions = [float(x) for x in self.milestones.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--milestones takes comma-separated fractions, got {self.milestones!r}") from None
        return sorted({max(1, round(f * self.epochs)) for f in fractions if 0 < f < 1})

    def record(self) -> dict:
        """The settings as plain JSON values (run records, and the comparison on resume)."""
        return json.loads(json.dumps(asdict(self), default=str))


def check_model(name: str) -> None:
    """Refuses a --model that is neither ours nor a timm model name, naming the nearest timm names."""
    if name == SMALL_MODEL:
        return
    import difflib

    import timm

    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise UserError(
            f"unknown model {name!r}: give {SMALL_MODEL} or a timm model name"
            + (f" (nearest: {', '.join(near)})" if near else " (timm.list_models() lists them)")
        )
