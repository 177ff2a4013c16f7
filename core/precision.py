"""The one rule for `--precision auto`, shared by every command that has the option: fp32 on the CPU; on a GPU,
bf16 where the GPU has it (compute capability 8.0 and later), else fp16. A runtime that runs only one precision
(ONNX Runtime on the fp32 graphs) says so instead of resolving."""

from __future__ import annotations

from realfake.core.defaults import PRECISIONS
from realfake.core.errors import UserError

AUTO_RULE = "auto: fp32 on the CPU; on a GPU bf16 where it has it, else fp16"


def resolve_precision(
    value: str, *, gpu: bool, bf16: bool, choices: tuple[str, ...] = PRECISIONS, option: str = "--precision"
) -> str:
    """`value` as a concrete precision (fp32, fp16, bf16 or int8) for a device: `gpu` whether the work runs on a
    GPU, `bf16` whether that GPU has bf16. `choices` are the values the caller offers (auto among them)."""
    if value not in choices:
        raise UserError(f"{option} takes {', '.join(choices)}, got {value!r}")
    if value != "auto":
        return value
    if not gpu:
        return "fp32"
    return "bf16" if bf16 else "fp16"
