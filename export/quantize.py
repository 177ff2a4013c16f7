"""`rf-export quantize`: an int8 UNet for CPU servers, by post-training quantization (OpenVINO + NNCF).

Calibration uses the UNet's real inputs: the fp32 sampler (ONNX Runtime) generates images for the given
prompts at the serving settings, and every UNet call on the way (noisy latents at every timestep, both
guidance halves, the text embeddings) is recorded. NNCF quantizes the convolutions and matmuls to int8 from
those statistics (softmax, normalisations and the rest stay in float). Then the int8 sampler and the fp32
sampler generate the same held-out seeds and the pixel difference is measured and written to
`quantize.json`; above the budget the command fails and no int8 model is left behind.

Output, next to the ONNX graphs: `unet.int8.xml` / `unet.int8.bin` (OpenVINO IR) and `quantize.json`.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np

from realfake.core.classes import load_classes
from realfake.core.dataset import render_prompt
from realfake.core.defaults import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS, DEFAULT_TEMPLATE
from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.serving.export_files import INT8_UNET, QUANTIZE_REPORT, graph_sha256, load_export_meta

PRESETS = ("performance", "mixed")


def class_prompts(class_set: str, count: int | None = None, template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Calibration prompts from a class set: every class in order, or `count` classes spread over the set (one
    fixed shuffle, the same every run)."""
    names = [c.name for c in load_classes(class_set)]
    if count is not None:
        random.Random(0).shuffle(names)
        names = names[:count]
    return [render_prompt(template, name) for name in names]


def _calibration_prompts(prompts: list[str], count: int) -> list[str]:
    return [prompts[i % len(prompts)] for i in range(count)]


def mirror_export(onnx_dir: Path, out: Path) -> None:
    """`out` as a complete export directory beside `onnx_dir`: every file linked (a copy where links cannot be
    made), so the int8 UNet can be written there without touching `onnx_dir` or copying gigabytes of weights."""
    from realfake.core.files import link_or_copy

    for src in onnx_dir.rglob("*"):
        if src.is_file() and src.name not in (INT8_UNET.name, INT8_UNET.with_suffix(".bin").name, QUANTIZE_REPORT):
            link_or_copy(src, out / src.relative_to(onnx_dir))


def quantize_unet(
    onnx_dir: str | Path,
    out: str | Path,
    prompts: list[str],
    negative: str,
    *,
    calibration_images: int = 8,
    check_images: int = 4,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    preset: str = "performance",
    budget: float = 6.0,
    log=print,
) -> dict:
    """Quantize `onnx_dir/unet.onnx` to `out/unet.int8.xml`; returns (and writes) the report. `out` becomes a
    complete export (the fp32 graphs linked from `onnx_dir`) for `rf-export repo out --precision int8`; it may be
    `onnx_dir` itself.

    `budget`: the largest mean |int8 - fp32| pixel difference (0-255 scale) accepted on the held-out images.
    """
    try:
        import nncf
        import openvino as ov
    except ImportError as exc:
        raise UserError("rf-export quantize needs `openvino` and `nncf` (pip install 'realfake[openvino]')") from exc
    from realfake.serving.components import OrtComponents, numpy_feed
    from realfake.serving.openvino_components import OvComponents
    from realfake.serving.sampler import Sampler, Settings

    onnx_dir, out = Path(onnx_dir), Path(out)
    load_export_meta(onnx_dir)
    if not (onnx_dir / "unet.onnx").is_file():
        raise UserError(f"{onnx_dir} has no unet.onnx: run `rf-export onnx` first")
    if preset not in PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if not prompts:
        raise UserError("no calibration prompts")
    if calibration_images < 1 or check_images < 1 or steps < 1:
        raise UserError("--calibration-images, --check-images and --steps must be at least 1")
    if out.resolve() != onnx_dir.resolve():
        if onnx_dir.resolve() in out.resolve().parents:
            raise UserError(f"--out {out} is inside {onnx_dir}: give {onnx_dir} itself or a directory beside it")
        mirror_export(onnx_dir, out)
        onnx_dir = out  # from here on the export quantize writes into
    graph = onnx_dir / "unet.onnx"

    recorded: list[dict[str, np.ndarray]] = []

    class Recording(OrtComponents):
        recording = True

        def unet(self, sample, timestep, encoder_hidden_states):
            if self.recording:
                feed = numpy_feed("unet", (sample, timestep, encoder_hidden_states))
                recorded.append({n: a.copy() for n, a in feed.items()})
            return super().unet(sample, timestep, encoder_hidden_states)

    settings = Settings(steps, guidance_scale)
    t0 = time.perf_counter()
    fp32 = Recording(onnx_dir)
    reference = Sampler(fp32, onnx_dir)
    calib_prompts = _calibration_prompts(prompts, calibration_images)
    for i, prompt in enumerate(calib_prompts):  # one image per call: the UNet sees batch 2 (both guidance halves)
        reference.generate([prompt], [negative], [1_000_000 + i], settings)
    fp32.recording = False
    log(f"  recorded {len(recorded)} UNet calls from {calibration_images} images ({time.perf_counter() - t0:.1f} s)")

    t1 = time.perf_counter()
    core = ov.Core()
    model = core.read_model(str(graph))
    nncf_preset = nncf.QuantizationPreset.MIXED if preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE
    quantized = nncf.quantize(
        model,
        nncf.Dataset(recorded),
        preset=nncf_preset,
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(recorded),
    )
    out_xml = onnx_dir / INT8_UNET
    tmp_xml = onnx_dir / INT8_UNET.with_suffix(".tmp.xml")
    ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
    quantize_seconds = time.perf_counter() - t1
    log(f"  quantized the UNet ({quantize_seconds:.1f} s)")

    # held-out check: same prompts, other seeds, int8 sampler vs fp32 sampler
    tmp_xml.replace(out_xml)
    tmp_xml.with_suffix(".bin").replace(out_xml.with_suffix(".bin"))
    try:
        int8 = Sampler(OvComponents(onnx_dir, "int8"), onnx_dir)
        check_prompts = _calibration_prompts(prompts[::-1], check_images)
        seeds = [2_000_000 + i for i in range(check_images)]
        negatives = [negative] * check_images
        ref_images = reference.generate(check_prompts, negatives, seeds, settings).astype(np.int16)
        q_images = int8.generate(check_prompts, negatives, seeds, settings).astype(np.int16)
        diff = np.abs(ref_images - q_images)
        report = {
            "unet_onnx_sha256": graph_sha256(graph),
            "openvino": ov.__version__,
            "nncf": nncf.__version__,
            "preset": preset,
            "calibration": {
                "images": calibration_images,
                "unet_calls": len(recorded),
                "steps": steps,
                "guidance_scale": guidance_scale,
                "prompts": sorted(set(calib_prompts)),
                "negative": negative,
            },
            "check": {
                "images": check_images,
                "mean_abs_pixel_diff": round(float(diff.mean()), 3),
                "p99_abs_pixel_diff": float(np.percentile(diff, 99)),
                "max_abs_pixel_diff": int(diff.max()),
                "budget_mean_abs_pixel_diff": budget,
            },
            "seconds": {"quantize": round(quantize_seconds, 2), "total": round(time.perf_counter() - t0, 2)},
        }
        write_atomic(onnx_dir / QUANTIZE_REPORT, json.dumps(report, indent=2).encode())
        if diff.mean() > budget:
            raise UserError(
                f"int8 UNet differs from fp32 by a mean {diff.mean():.2f}/255 per pixel on held-out seeds "
                f"(budget {budget}); not kept. Try more --calibration-images or the other --preset; report in "
                f"{onnx_dir / QUANTIZE_REPORT}"
            )
    except BaseException:
        out_xml.unlink(missing_ok=True)
        out_xml.with_suffix(".bin").unlink(missing_ok=True)
        raise
    log(
        f"  held-out check: mean |int8 - fp32| {diff.mean():.2f}/255 per pixel, p99 "
        f"{report['check']['p99_abs_pixel_diff']:.0f}, max {diff.max()} (budget {budget})"
    )
    return report
