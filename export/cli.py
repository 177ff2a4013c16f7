"""`rf-export`: bundles to ONNX (parity-checked), TensorRT plans, the int8 UNet, Triton repositories, and the tiny
test bundle."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated

import typer

from realfake.core.cli import (
    Debug,
    Placement,
    Precision,
    Runtime,
    Scheduler,
    ServePrecision,
    int_list,
    make_app,
    moved_to_out,
    run_cli,
)
from realfake.core.defaults import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_NEGATIVE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    DEFAULT_TEMPLATE,
)

app = make_app("Export a diffusers-layout bundle to ONNX and a Triton model repository.")


def _quiet_tracer_warnings() -> None:
    # The TorchScript exporter warns about every Python branch on tensor shapes; they are expected here.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from torch.jit import TracerWarning

        warnings.filterwarnings("ignore", category=TracerWarning)
    except ImportError:
        pass


@app.command()
def onnx(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="Diffusers-layout model directory.")],
    out_positional: Annotated[Path | None, typer.Argument(hidden=True)] = None,  # the old positional OUT
    out: Annotated[Path | None, typer.Option(help="Directory for <component>.onnx, export.json, parity.json.")] = None,
    tolerance: Annotated[float, typer.Option(help="Max |ONNX - PyTorch| allowed per component.")] = 1e-3,
    if_changed: Annotated[
        bool,
        typer.Option(
            "--if-changed",
            help="Keep an export in --out made from this very bundle (export.json's bundle identity); an export "
            "of another bundle is removed and made again. Without it the export is always made.",
        ),
    ] = False,
    debug: Debug = False,
) -> None:
    """Export text encoder, UNet, VAE decoder/encoder (and image encoder) to ONNX, then check parity."""
    from realfake.export.onnx_export import export_onnx, export_onnx_if_changed

    out = moved_to_out(out_positional, out)
    _quiet_tracer_warnings()
    if not if_changed:
        export_onnx(bundle, out, tolerance=tolerance)
    elif export_onnx_if_changed(bundle, out, tolerance=tolerance, warn=lambda m: typer.echo(m, err=True)) is None:
        return
    typer.echo(f"ONNX export ok: {out} (parity report: {out / 'parity.json'})")


@app.command()
def parity(
    bundle: Annotated[Path, typer.Argument(metavar="BUNDLE", help="The bundle the graphs were exported from.")],
    onnx_dir: Annotated[Path, typer.Argument(metavar="ONNX_DIR", help="Directory written by `rf-export onnx`.")],
    tolerance: Annotated[float, typer.Option(help="Max |ONNX - PyTorch| allowed per component.")] = 1e-3,
    debug: Debug = False,
) -> None:
    """Re-check an ONNX export against its bundle, one component at a time, at batch 1 and 2 (UNet, VAE) or 1 and 8
    (the encoders); exit 2 above the tolerance."""
    from realfake.export.onnx_export import check_parity

    _quiet_tracer_warnings()
    check_parity(bundle, onnx_dir, tolerance=tolerance)
    typer.echo(f"parity ok: {onnx_dir / 'parity.json'}")


@app.command()
def repo(
    onnx_dir: Annotated[Path, typer.Argument(metavar="ONNX_DIR", help="Directory written by `rf-export onnx`.")],
    out: Annotated[Path, typer.Option(help="Model repository to write.")],
    runtime: Annotated[
        Runtime,
        typer.Option(
            help="python-ort (CPU: ONNX Runtime in Python-backend models), openvino (CPU; fp32, bf16, int8), "
            "onnxruntime or tensorrt (Triton's native GPU backends), pytorch (the bundle's modules; GPU, or CPU "
            "with --device cpu)."
        ),
    ] = "python-ort",
    scheduler: Annotated[Scheduler, typer.Option(help="Sampler.")] = DEFAULT_SCHEDULER,
    max_batch_size: Annotated[
        int | None,
        typer.Option(
            help="Largest pipeline batch (images) the dynamic batcher forms. [default: 32; tensorrt: the plans' "
            "largest profile batch, and no more]"
        ),
    ] = None,
    queue_delay_us: Annotated[int, typer.Option(help="Dynamic batching queue delay, microseconds.")] = 5000,
    placement: Annotated[
        Placement,
        typer.Option(
            help="Where the graphs run. bls: separate models called by BLS; inprocess: inside the pipeline "
            "(python-ort; tensorrt: the plans in each pipeline instance, on its own GPU). openvino and pytorch "
            "always run inside the pipeline.",
        ),
    ] = "bls",
    engines: Annotated[Path | None, typer.Option(help="Plans from `rf-export engines` (runtime tensorrt).")] = None,
    bundle: Annotated[Path | None, typer.Option(help="The bundle itself (runtime pytorch).")] = None,
    device: Annotated[str | None, typer.Option(help="Pipeline device: cpu or cuda (default by runtime).")] = None,
    precision: Annotated[
        ServePrecision,
        typer.Option(
            help="auto: fp32 on the CPU; on a GPU bf16 where it has it, else fp16. pytorch: any but int8. "
            "openvino: fp32, bf16, int8 (needs `rf-export quantize` first). python-ort and onnxruntime run the "
            "fp32 graphs; tensorrt the plans' own precision (`rf-export engines --precision`)."
        ),
    ] = "auto",
    memory_budget: Annotated[
        float | None,
        typer.Option(
            help="CPU servers: GB the server may use (default: this machine's memory). The pipeline samples at "
            "most the images that fit per call, splitting larger batches before they run, and decodes one "
            "image per VAE call."
        ),
    ] = None,
    debug: Debug = False,
) -> None:
    """Write the Triton model repository: component models plus the `pipeline` model."""
    from realfake.export.triton_repo import write_repository

    write_repository(
        onnx_dir,
        out,
        runtime=runtime,
        scheduler=scheduler,
        max_batch=max_batch_size,
        queue_delay_us=queue_delay_us,
        placement=placement,
        engines=engines,
        bundle=bundle,
        device=device,
        precision=precision,
        memory_budget_gb=memory_budget,
    )
    typer.echo(f"model repository written: {out}")


@app.command()
def quantize(
    onnx_dir: Annotated[Path, typer.Argument(metavar="ONNX_DIR", help="Directory written by `rf-export onnx`.")],
    out: Annotated[
        Path,
        typer.Option(
            help="Export directory to write: the int8 UNet beside the fp32 graphs (linked, not copied, from "
            "ONNX_DIR); may be ONNX_DIR itself."
        ),
    ],
    classes: Annotated[
        str, typer.Option(help="Class set whose prompts calibrate: imagenet, cifar10, cifar100, fashion-mnist, a file.")
    ] = "imagenet",
    prompt_template: Annotated[
        str, typer.Option(help="Prompt with {class} (rf-client generate's default; no captions here).")
    ] = DEFAULT_TEMPLATE,
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt.")] = DEFAULT_NEGATIVE,
    calibration_images: Annotated[int, typer.Option(help="Images whose UNet calls calibrate (x steps calls).")] = 8,
    check_images: Annotated[int, typer.Option(help="Held-out images compared with fp32.")] = 4,
    steps: Annotated[int, typer.Option(help="Sampler steps, as served.")] = DEFAULT_STEPS,
    guidance_scale: Annotated[
        float, typer.Option(help="Classifier-free guidance scale, as served.")
    ] = DEFAULT_GUIDANCE_SCALE,
    preset: Annotated[str, typer.Option(help="NNCF preset: performance (symmetric) or mixed.")] = "performance",
    budget: Annotated[
        float, typer.Option(help="Largest mean |int8 - fp32| per pixel (0-255) on held-out images; above it: exit 2.")
    ] = 6.0,
    debug: Debug = False,
) -> None:
    """Quantize the UNet to int8 for `rf-export repo OUT --runtime openvino --precision int8` (CPU servers).

    Calibrates on the UNet's own inputs while the fp32 sampler draws images for prompts of the class set,
    then compares int8 with fp32 images on held-out seeds; writes unet.int8.xml/.bin and quantize.json.
    """
    from realfake.export.quantize import class_prompts, quantize_unet
    from realfake.serving.export_files import INT8_UNET, QUANTIZE_REPORT

    prompts = class_prompts(classes, max(calibration_images, check_images), prompt_template)
    report = quantize_unet(
        onnx_dir,
        out,
        prompts,
        negative_prompt,
        calibration_images=calibration_images,
        check_images=check_images,
        steps=steps,
        guidance_scale=guidance_scale,
        preset=preset,
        budget=budget,
        log=typer.echo,
    )
    typer.echo(
        f"int8 UNet written: {out / INT8_UNET} (mean pixel difference "
        f"{report['check']['mean_abs_pixel_diff']}/255; report {out / QUANTIZE_REPORT})"
    )


@app.command()
def engines(
    onnx_dir: Annotated[Path, typer.Argument(metavar="ONNX_DIR", help="Directory written by `rf-export onnx`.")],
    out: Annotated[Path, typer.Option(help="Folder for the plans, their metadata and the timing cache.")],
    batch_sizes: Annotated[
        str,
        typer.Option(help="Image batch sizes the server will form, comma-separated (the profile's min/opt/max)."),
    ] = "1,4,8,16",
    precision: Annotated[
        Precision, typer.Option(help="auto: bf16 on a GPU that has it (compute capability 8.0+), else fp16.")
    ] = "auto",
    debug: Debug = False,
) -> None:
    """Build TensorRT plans for this machine's GPU (kept when already built for it; rebuilt when not)."""
    from realfake.export.tensorrt_build import build_plans

    sizes = int_list(batch_sizes, "--batch-sizes")
    for r in build_plans(onnx_dir, out, sizes, precision=precision, log=lambda m: typer.echo(m, err=True)):
        typer.echo(f"{r.component:<13} {'built' if r.built else 'kept '} {r.plan} ({r.reason}, {r.seconds:.0f}s)")


@app.command("tiny-bundle")
def tiny_bundle(
    out_positional: Annotated[Path | None, typer.Argument(hidden=True)] = None,  # the old positional OUT
    out: Annotated[Path | None, typer.Option(help="Directory for the bundle.")] = None,
    seed: Annotated[int, typer.Option(help="Weight seed.")] = 0,
    image_encoder: Annotated[bool, typer.Option(help="Include a CLIP image encoder.")] = True,
    debug: Debug = False,
) -> None:
    """Build a tiny Stable-Diffusion-layout bundle with seeded random weights (tests, demos)."""
    from realfake.export.tiny_bundle import build_tiny_bundle

    out = moved_to_out(out_positional, out)
    _quiet_tracer_warnings()
    build_tiny_bundle(out, seed=seed, image_encoder=image_encoder)
    typer.echo(f"tiny bundle written: {out}")


@app.command()
def tiny(
    out: Annotated[Path, typer.Option(help="Directory for bundle/, onnx/ and repo/.")],
    seed: Annotated[int, typer.Option(help="Weight seed.")] = 0,
    debug: Debug = False,
) -> None:
    """The embedded default model in one step: tiny bundle -> ONNX (parity-checked) -> repository."""
    from realfake.export.onnx_export import export_onnx
    from realfake.export.tiny_bundle import build_tiny_bundle
    from realfake.export.triton_repo import write_repository

    _quiet_tracer_warnings()
    build_tiny_bundle(out / "bundle", seed=seed)
    export_onnx(out / "bundle", out / "onnx", log=lambda m: typer.echo(m, err=True))
    write_repository(out / "onnx", out / "repo")
    typer.echo(f"tiny model ready: {out / 'repo'}")


def main() -> None:
    run_cli(app, "rf-export")


if __name__ == "__main__":
    main()
