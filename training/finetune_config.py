"""The settings of `rf-train finetune`, said once: the CLI's defaults and the run record read them from here (no
torch import, so `rf-train --help` stays quick)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from realfake.core.errors import UserError

PRECISIONS = ("auto", "no", "fp16", "bf16")


@dataclass
class FinetuneConfig:
    bundle: Path
    data: Path
    out: Path
    classes: str
    captions: Path | None = None
    rank: int = 4
    lora_alpha: float | None = None  # None: equal to rank
    lr: float = 1e-4
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    dm_weight: float = 0.003
    snr_gamma: float = 5.0
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    merge_scale: float = 0.5
    mixed_precision: str = "auto"  # PRECISIONS; auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU
    gradient_checkpointing: bool = False  # recompute the UNet's activations in backward: less memory, ~1/3 slower
    guidance_token: bool = True  # used when the bundle has an image encoder
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def validate(self) -> None:
        for name in ("rank", "batch_size", "grad_accum", "max_steps", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.dm_weight < 0 or self.snr_gamma <= 0:
            raise UserError("--lr and --snr-gamma must be > 0 and --dm-weight >= 0")
        if self.mixed_precision not in PRECISIONS:
            raise UserError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {self.mixed_precision!r}")
