"""GPU throughput on a Stable-Diffusion-1.5-architecture bundle with random weights (same compute as the real
model, nothing downloaded): 512x512, 30 UniPC steps, classifier-free guidance, batch 1/4/8/16.

Paths measured in one run, alternating: (a) diffusers StableDiffusionPipeline fp16 eager (the baseline),
(b) realfake's sampler on the PyTorch runtime (fp16, channels-last, SDPA), (c) the same with torch.compile,
(d) the sampler on ONNX Runtime's CUDA provider (I/O bound to the CUDA tensors),
(e) the sampler on TensorRT plans (when `tensorrt` imports).
Ratios against (a) are printed with the FLOP-ceiling utilisation: UNet FLOPs x steps x 2 / time / the measured
fp16 matmul rate. `--smoke` runs the same code on the CPU with the tiny bundle, to check it without a GPU.

Usage: python bench/gpu_bench.py [--batches 1,4,8,16] [--out bench-gpu.json] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from realfake.core.defaults import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS

PROMPT = "photo of tench, best quality"


def sd15_bundle(out: Path) -> Path:
    """SD 1.5's UNet, VAE and text-encoder shapes, random weights, real CLIP tokenizer."""
    from realfake.export.tiny_bundle import build_sd15_shape_bundle

    return build_sd15_shape_bundle(out, image_encoder=False)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s: the ceiling the utilisation is quoted against."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    reps, t0 = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def unet_flops(bundle: Path, device, dtype, batch: int) -> float:
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet2DConditionModel.from_pretrained(bundle / "unet").to(device, dtype).eval()
    side = unet.config.sample_size
    x = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, torch.tensor([500] * batch, device=device), ctx)
    return float(counter.get_total_flops())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,4,8,16")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance-scale", "--guidance", type=float, default=DEFAULT_GUIDANCE_SCALE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-gpu.json"))
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny bundle, few steps: checks the code")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from diffusers import StableDiffusionPipeline, UniPCMultistepScheduler

    from realfake.export.onnx_export import export_onnx
    from realfake.export.tiny_bundle import build_tiny_bundle
    from realfake.serving.components import OrtComponents
    from realfake.serving.sampler import Sampler, Settings
    from realfake.serving.torch_components import TorchComponents

    if args.smoke:
        device, dtype, steps, batches = torch.device("cpu"), torch.float32, 4, [1, 2]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu_bench.py needs a CUDA GPU (use --smoke to check it on the CPU)")
        device, dtype, steps = torch.device("cuda"), torch.float16, args.steps
        batches = [int(b) for b in args.batches.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="rf-gpubench-") as tmp:
        root = Path(tmp)
        bundle = build_tiny_bundle(root / "bundle") if args.smoke else sd15_bundle(root / "bundle")
        export_onnx(bundle, root / "onnx", tolerance=1e-2 if not args.smoke else 1e-3, log=lambda *_: None)
        pipe = StableDiffusionPipeline.from_pretrained(bundle, torch_dtype=dtype).to(device)
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        samplers = {
            "b_pytorch_fp16": Sampler(TorchComponents(bundle, device), root / "onnx"),
            "c_pytorch_compile": Sampler(TorchComponents(bundle, device, compile=True), root / "onnx"),
            "d_onnxruntime": Sampler(OrtComponents(root / "onnx", device=device), root / "onnx"),
        }
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            print("tensorrt not installed: no TensorRT row")
        else:
            if device.type == "cuda":
                from realfake.export.tensorrt_build import build_plans
                from realfake.serving.tensorrt_components import TrtComponents

                t0 = time.perf_counter()
                build_plans(root / "onnx", root / "engines", batches, precision="fp16", log=print)
                print(f"TensorRT fp16 plans built in {time.perf_counter() - t0:.0f} s (timing cache in the run's tmp)")
                samplers["e_tensorrt_fp16"] = Sampler(
                    TrtComponents.from_export(root / "engines", root / "onnx"), root / "onnx"
                )
        ceiling = matmul_rate(device, dtype)
        for batch in batches:
            flops = unet_flops(bundle, device, dtype, 2 * batch)  # both guidance halves per step
            paths = {
                "a_diffusers_eager": lambda b=batch: pipe(
                    [PROMPT] * b,
                    num_inference_steps=steps,
                    guidance_scale=args.guidance_scale,
                    generator=[torch.Generator().manual_seed(i) for i in range(b)],
                    output_type="np",
                )
            }
            for name, sampler in samplers.items():
                paths[name] = lambda s=sampler, b=batch: s.generate(
                    [PROMPT] * b, [""] * b, list(range(b)), Settings(steps, args.guidance_scale)
                )
            for fn in paths.values():
                fn()
            times: dict[str, list[float]] = {k: [] for k in paths}
            for _ in range(args.repeats):
                for name, fn in paths.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    times[name].append(time.perf_counter() - t0)
            ips = {k: batch / statistics.median(v) for k, v in times.items()}
            row = {
                "batch": batch,
                "steps": steps,
                "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                "images_per_sec": {k: round(v, 3) for k, v in ips.items()},
                "ratio_vs_diffusers": {k: round(v / ips["a_diffusers_eager"], 3) for k, v in ips.items()},
                "unet_flops_per_step": flops,
                "matmul_flops_per_sec": ceiling,
                "utilisation": {k: round(flops * steps * v / batch / ceiling, 4) for k, v in ips.items()},
            }
            rows.append(row)
            print(
                f"batch {batch:>2}: "
                + ", ".join(
                    f"{k} {v:.2f} img/s ({row['ratio_vs_diffusers'][k]:.2f}x, "
                    f"{100 * row['utilisation'][k]:.0f}% of matmul peak)"
                    for k, v in ips.items()
                ),
                flush=True,
            )
    args.out.write_text(json.dumps({"results": rows}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
