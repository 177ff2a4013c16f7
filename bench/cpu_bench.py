"""CPU throughput, measured in one run on the same bundle, prompts, seeds, steps and guidance_scale:

  (a) diffusers' StableDiffusionPipeline in-process, eager PyTorch (the baseline a user would script),
  (b) realfake's sampler in-process on ONNX Runtime,
  (c) the full path: rf-client's PipelineClient -> local Triton -> `pipeline` model, with the components
      in the pipeline's process (`inprocess`, c) and as separate models called by BLS (`bls`, c_bls), and
      `--also` variants of (c) on other runtimes/precisions: openvino-int8 (the UNet quantized first by
      realfake.export.quantize, calibrated on other prompts than the benchmark's), openvino-bf16,
      openvino-fp32, pytorch-bf16.

Rounds alternate (a), (b), (c) several times; medians of images/sec are reported with the ratios (c)/(a) and
(c)/(b), printed and written as JSON, as is each path at its own best batch over diffusers at its best.
Usage: python bench/cpu_bench.py [--sizes tiny,mid] [--also openvino-int8] [--out bench-cpu.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from realfake.core.defaults import DEFAULT_GUIDANCE_SCALE, DEFAULT_NEGATIVE, DEFAULT_STEPS

SIZES = {
    # the tiny test bundle, and one with 4x its UNet/VAE/text widths (same image size)
    "tiny": {"unet_blocks": (32, 64), "vae_blocks": (32, 64), "text_hidden": 32},
    "mid": {"unet_blocks": (128, 256), "vae_blocks": (128, 256), "text_hidden": 128},
}
PROMPT = "photo of tench, best quality"
NEGATIVE = DEFAULT_NEGATIVE
VARIANTS = ("openvino-fp32", "openvino-bf16", "openvino-int8", "pytorch-bf16")


def build(size: str, root: Path) -> tuple[Path, Path, Path, Path]:
    from realfake.export.onnx_export import export_onnx
    from realfake.export.tiny_bundle import build_tiny_bundle
    from realfake.export.triton_repo import write_repository

    bundle = build_tiny_bundle(root / size / "bundle", seed=0, **SIZES[size])
    export_onnx(bundle, root / size / "onnx", log=lambda *_: None)
    inprocess = write_repository(root / size / "onnx", root / size / "repo_inprocess", placement="inprocess")
    bls = write_repository(root / size / "onnx", root / size / "repo_bls", placement="bls")
    return bundle, root / size / "onnx", inprocess, bls


def run_diffusers(bundle: Path, images: int, batch: int, steps: int, guidance_scale: float):
    import torch
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    pipe = StableDiffusionPipeline.from_pretrained(bundle, local_files_only=True)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)

    def go(images=images):
        for start in range(0, images, batch):
            n = min(batch, images - start)
            gens = [torch.Generator().manual_seed(start + i) for i in range(n)]
            pipe(
                [PROMPT] * n,
                negative_prompt=[NEGATIVE] * n,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                generator=gens,
                output_type="np",
            )

    return go


def run_ort(onnx_dir: Path, images: int, batch: int, steps: int, guidance_scale: float):
    from realfake.serving.components import OrtComponents
    from realfake.serving.sampler import Sampler, Settings

    sampler = Sampler(OrtComponents(onnx_dir), onnx_dir)

    def go(images=images):
        for start in range(0, images, batch):
            n = min(batch, images - start)
            sampler.generate(
                [PROMPT] * n, [NEGATIVE] * n, list(range(start, start + n)), Settings(steps, guidance_scale)
            )

    return go


def run_triton(url: str, images: int, batch: int, steps: int, guidance_scale: float, concurrency: int):
    from realfake.client.throughput import _arrays
    from realfake.client.triton import PipelineClient

    def go(images=images):
        starts = iter(range(0, images, batch))
        lock = threading.Lock()
        errors = []

        def worker():
            client = PipelineClient(url)
            while True:
                with lock:
                    start = next(starts, None)
                if start is None:
                    return
                arrays = _arrays(min(batch, images - start), start, steps, guidance_scale, PROMPT)
                arrays["NEGATIVE_PROMPT"] = np.array([[NEGATIVE.encode()]] * len(arrays["SEED"]), dtype=np.object_)
                try:
                    client.infer(arrays)
                except Exception as exc:  # noqa: BLE001 - reported after the round
                    errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"{len(errors)} Triton requests failed: {errors[0]}")

    return go


def variant_repo(variant: str, bundle: Path, onnx_dir: Path, root: Path, steps: int, guidance_scale: float) -> Path:
    """A repository for one extra (c) variant (VARIANTS); int8 is calibrated first, at the benchmark's settings."""
    from realfake.export.quantize import class_prompts, quantize_unet
    from realfake.export.triton_repo import write_repository
    from realfake.serving.export_files import INT8_UNET

    runtime, _, dtype = variant.partition("-")
    if runtime == "pytorch":
        return write_repository(
            onnx_dir, root / f"repo_{variant}", runtime="pytorch", bundle=bundle, device="cpu", dtype=dtype
        )
    if dtype == "int8" and not (onnx_dir / INT8_UNET).is_file():
        t0 = time.perf_counter()
        # calibrated on other classes' prompts than the benchmark's own, as a deployment would be
        prompts = class_prompts("imagenet", 8)
        report = quantize_unet(
            onnx_dir,
            onnx_dir,
            prompts,
            NEGATIVE,
            calibration_images=4,
            check_images=2,
            steps=steps,
            guidance_scale=guidance_scale,
            log=lambda *_: None,
        )
        print(
            f"  int8 calibration: {time.perf_counter() - t0:.0f} s, held-out mean pixel difference "
            f"{report['check']['mean_abs_pixel_diff']}/255 vs fp32"
        )
    return write_repository(onnx_dir, root / f"repo_{variant}", runtime="openvino", dtype=dtype)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny,mid")
    parser.add_argument("--images", type=int, default=8, help="images per round and path")
    parser.add_argument("--batches", default="1,8", help="images per call/request")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight for (c)")
    parser.add_argument("--with-bls", action="store_true", help="also measure (c) with BLS component models")
    parser.add_argument(
        "--also",
        default="",
        help="more (c) variants, comma-separated: openvino-fp32, openvino-bf16, openvino-int8 (after an int8 "
        "calibration, timed apart), pytorch-bf16. Not bit-exact except openvino-fp32.",
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance-scale", "--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench-cpu.json"))
    args = parser.parse_args()
    also = [v for v in args.also.split(",") if v]
    unknown = [v for v in also if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown --also variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    warnings.filterwarnings("ignore")
    from realfake.client.server import LocalServer

    results = []
    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        for size in args.sizes.split(","):
            bundle, onnx_dir, repo, repo_bls = build(size, Path(tmp))
            with contextlib.ExitStack() as stack:
                server = stack.enter_context(LocalServer(repo))
                server_bls = stack.enter_context(LocalServer(repo_bls)) if args.with_bls else None
                variants = {}
                for variant in also:
                    repo_v = variant_repo(variant, bundle, onnx_dir, Path(tmp) / size, args.steps, args.guidance_scale)
                    variants[variant] = stack.enter_context(LocalServer(repo_v))
                for batch in (int(b) for b in args.batches.split(",")):
                    paths = {
                        "a_diffusers_eager": run_diffusers(bundle, args.images, batch, args.steps, args.guidance_scale),
                        "b_ort_in_process": run_ort(onnx_dir, args.images, batch, args.steps, args.guidance_scale),
                        "c_triton": run_triton(
                            server.url, args.images, batch, args.steps, args.guidance_scale, args.concurrency
                        ),
                    }
                    if args.with_bls:
                        paths["c_triton_bls"] = run_triton(
                            server_bls.url, args.images, batch, args.steps, args.guidance_scale, args.concurrency
                        )
                    for variant, vserver in variants.items():
                        paths[f"c_triton_{variant}"] = run_triton(
                            vserver.url, args.images, batch, args.steps, args.guidance_scale, args.concurrency
                        )
                    for fn in paths.values():  # warm-up: the first call allocates and loads kernels
                        fn(batch)
                    times: dict[str, list[float]] = {k: [] for k in paths}
                    for _ in range(args.repeats):
                        for name, fn in paths.items():  # alternate, so drift hits every path alike
                            times[name].append(timed(fn))
                    ips = {k: args.images / statistics.median(v) for k, v in times.items()}
                    row = {
                        "size": size,
                        "batch": batch,
                        "images": args.images,
                        "steps": args.steps,
                        "guidance_scale": args.guidance_scale,
                        "concurrency_c": args.concurrency,
                        "repeats": args.repeats,
                        "images_per_sec": {k: round(v, 3) for k, v in ips.items()},
                        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
                        "c_over_a": round(ips["c_triton"] / ips["a_diffusers_eager"], 3),
                        "c_over_b": round(ips["c_triton"] / ips["b_ort_in_process"], 3),
                        "b_over_a": round(ips["b_ort_in_process"] / ips["a_diffusers_eager"], 3),
                        "variants_over_a": {
                            v: round(ips[f"c_triton_{v}"] / ips["a_diffusers_eager"], 3) for v in variants
                        },
                    }
                    results.append(row)
                    print(
                        f"{size:>5} batch {batch:>2}: diffusers {ips['a_diffusers_eager']:.2f} img/s, "
                        f"ORT {ips['b_ort_in_process']:.2f}, Triton {ips['c_triton']:.2f} "
                        + (f"(BLS components {ips['c_triton_bls']:.2f}) " if args.with_bls else "")
                        + "".join(
                            f"({v} {ips[f'c_triton_{v}']:.2f}, {row['variants_over_a'][v]:.2f}x) " for v in variants
                        )
                        + "| "
                        f"(c)/(a) {row['c_over_a']:.2f}  (c)/(b) {row['c_over_b']:.2f}",
                        flush=True,
                    )
    best = {}
    for row in results:
        if row["size"] not in best or row["c_over_a"] > best[row["size"]]["c_over_a"]:
            best[row["size"]] = row
    # each path at its own best batch setting: what a user of either would actually run
    best_of_path: dict[str, dict[str, dict]] = {}
    for row in results:
        paths = best_of_path.setdefault(row["size"], {})
        for path, value in row["images_per_sec"].items():
            if path not in paths or value > paths[path]["images_per_sec"]:
                paths[path] = {"images_per_sec": value, "batch": row["batch"]}
    summary = {
        "cpu_count": os.cpu_count(),
        "results": results,
        "best_batch_per_path": best_of_path,
        "best_by_size": {
            k: {"batch": v["batch"], "c_over_a": v["c_over_a"], "c_over_b": v["c_over_b"]} for k, v in best.items()
        },
    }
    args.out.write_text(json.dumps(summary, indent=2))
    print(
        "best (c)/(a) per size: "
        + ", ".join(f"{k}: {v['c_over_a']:.2f} at batch {v['batch']}" for k, v in best.items())
        + f"; written to {args.out}"
    )
    for size, paths in best_of_path.items():
        base = paths["a_diffusers_eager"]
        print(
            f"{size}: each path at its best batch, over diffusers at its best (batch {base['batch']}, "
            f"{base['images_per_sec']:.2f} img/s): "
            + ", ".join(
                f"{p} {v['images_per_sec'] / base['images_per_sec']:.2f}x (batch {v['batch']})"
                for p, v in paths.items()
                if p != "a_diffusers_eager"
            )
        )


if __name__ == "__main__":
    main()
