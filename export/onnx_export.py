"""Bundle -> ONNX: one graph per component with a dynamic batch axis, and a parity report against PyTorch.

Graph contracts (names are what the Triton repository and the sampler use):
  text_encoder   input_ids int64 [B,77]                                -> hidden_states f32 [B,77,D]
  unet           sample f32 [B,4,h,w], timestep f32 [B], encoder_hidden_states f32 [B,77,D] -> noise_pred [B,4,h,w]
  vae_decoder    latents f32 [B,4,h,w] (scaled, as the UNet sees them)  -> image f32 [B,3,H,W] in [-1,1]
  vae_encoder    image f32 [B,3,H,W] in [-1,1]                          -> moments f32 [B,8,h,w] (mean, logvar)
  image_encoder  pixel_values f32 [B,3,S,S] (CLIP-normalised)           -> image_embeds f32 [B,D]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from realfake.core.errors import UserError
from realfake.serving.export_files import graph_files
from realfake.serving.model_bundle import (
    TEXT_MAX_LENGTH,
    BundleInfo,
    bundle_identity,
    check_bundle,
    component_names,
    load_torch_modules,
)

OPSET = 17
# fp32 ONNX vs fp32 PyTorch differ only by kernel order; anything above this is a broken export.
DEFAULT_TOLERANCE = 1e-3
# Parity proves the dynamic batch axis at two batch sizes. The image-sized components (UNet, VAE) are checked at 1
# and 2: at SD-1.5 size the 512-px VAE decoder's batch-8 fp32 activations, held by ONNX Runtime and PyTorch at
# once, were most of a 23 GB peak; the encoders are small at any batch and are checked at 1 and 8.
PARITY_BATCHES = {"unet": (1, 2), "vae_decoder": (1, 2), "vae_encoder": (1, 2)}
DEFAULT_PARITY_BATCHES = (1, 8)


def parity_batches(name: str) -> tuple[int, ...]:
    return PARITY_BATCHES.get(name, DEFAULT_PARITY_BATCHES)


# A protobuf holds at most 2 GiB, so graphs with more weights than this (SD-1.5's fp32 UNet: 3.4 GB) keep them in
# one `<component>.onnx.data` file beside the graph; smaller ones stay a single file.
EXTERNAL_DATA_ABOVE = 1 << 30


class ParityError(UserError):
    pass


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]


SPECS = {
    "text_encoder": ComponentSpec(
        "text_encoder", ("input_ids",), ("hidden_states",), {"input_ids": {0: "B"}, "hidden_states": {0: "B"}}
    ),
    "unet": ComponentSpec(
        "unet",
        ("sample", "timestep", "encoder_hidden_states"),
        ("noise_pred",),
        {
            "sample": {0: "B", 2: "h", 3: "w"},
            "timestep": {0: "B"},
            "encoder_hidden_states": {0: "B"},
            "noise_pred": {0: "B", 2: "h", 3: "w"},
        },
    ),
    "vae_decoder": ComponentSpec(
        "vae_decoder",
        ("latents",),
        ("image",),
        {"latents": {0: "B", 2: "h", 3: "w"}, "image": {0: "B", 2: "H", 3: "W"}},
    ),
    "vae_encoder": ComponentSpec(
        "vae_encoder",
        ("image",),
        ("moments",),
        {"image": {0: "B", 2: "H", 3: "W"}, "moments": {0: "B", 2: "h", 3: "w"}},
    ),
    "image_encoder": ComponentSpec(
        "image_encoder", ("pixel_values",), ("image_embeds",), {"pixel_values": {0: "B"}, "image_embeds": {0: "B"}}
    ),
}


def example_inputs(name: str, info: BundleInfo, batch: int, seed: int = 0, image_encoder_size: int = 224):
    """Seeded example inputs for a component at a batch size (used for export tracing and parity)."""
    rng = np.random.default_rng(seed)
    side = info.image_size // info.vae_scale_factor
    if name == "text_encoder":
        ids = rng.integers(0, 49406, size=(batch, TEXT_MAX_LENGTH), dtype=np.int64)
        ids[:, 0] = 49406
        ids[:, -1] = 49407
        return {"input_ids": ids}
    if name == "unet":
        return {
            "sample": rng.standard_normal((batch, info.latent_channels, side, side), dtype=np.float32),
            "timestep": rng.uniform(0, 999, size=(batch,)).astype(np.float32),
            "encoder_hidden_states": rng.standard_normal(
                (batch, TEXT_MAX_LENGTH, info.text_hidden_size), dtype=np.float32
            ),
        }
    if name == "vae_decoder":
        return {"latents": rng.standard_normal((batch, info.latent_channels, side, side), dtype=np.float32)}
    if name == "vae_encoder":
        return {"image": rng.uniform(-1, 1, size=(batch, 3, info.image_size, info.image_size)).astype(np.float32)}
    if name == "image_encoder":
        shape = (batch, 3, image_encoder_size, image_encoder_size)
        return {"pixel_values": rng.standard_normal(shape, dtype=np.float32)}
    raise KeyError(name)


def _image_encoder_size(info: BundleInfo) -> int:
    """The image encoder's input side, from its config (no weights loaded); 224 when there is none."""
    config = info.path / "image_encoder" / "config.json"
    if not info.has_image_encoder or not config.is_file():
        return 224
    return int(json.loads(config.read_text()).get("image_size", 224))


def _vae_scaling_factor(info: BundleInfo) -> float:
    return float(json.loads((info.path / "vae" / "config.json").read_text()).get("scaling_factor", 0.18215))


def _free(*objects) -> None:
    """Let go of a component's module or session now: the next component must not find it still resident."""
    import gc

    del objects
    gc.collect()


def _session(path: Path):
    """An ONNX Runtime CPU session that returns its memory when it goes (no arena holding the peak)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _place_graph(raw: Path, target: Path, external_above: int) -> None:
    """Move an exported graph (and whatever weight files the exporter scattered beside it) to `target`: one file,
    or `target` + `<name>.data` when the weights exceed `external_above` bytes. Replaced atomically per file."""
    import onnx

    data = target.with_name(target.name + ".data")
    scattered = [p for p in raw.parent.iterdir() if p != raw]
    if not scattered and raw.stat().st_size <= external_above:
        os.replace(raw, target)
        data.unlink(missing_ok=True)
        return
    model = onnx.load(str(raw))  # pulls any external weights in
    staged = raw.parent.parent / "staged"
    staged.mkdir()
    weights = sum(len(t.raw_data) for t in model.graph.initializer)
    if weights > external_above:
        onnx.save_model(
            model,
            str(staged / target.name),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=data.name,
            size_threshold=1024,
        )
        shutil.copymode(staged / target.name, staged / data.name)  # onnx creates it owner-only
        os.replace(staged / data.name, data)
    else:
        onnx.save_model(model, str(staged / target.name))
        data.unlink(missing_ok=True)
    os.replace(staged / target.name, target)


def export_is_current(bundle: str | Path, out: str | Path) -> tuple[bool, str | None]:
    """Whether `out` holds an export of exactly `bundle` (its identity, a content hash of the files the pipeline
    loads, is the one export.json records); and the recorded identity, None when there is no export."""
    record = Path(out) / "export.json"
    if not record.is_file():
        return False, None
    try:
        made_from = json.loads(record.read_text()).get("bundle_identity")
    except ValueError:
        return False, "unreadable"
    return made_from == bundle_identity(bundle), made_from


def clear_export(out: Path) -> None:
    """Remove an export's files from `out` (the graphs, their weights, the int8 UNet, the records), so a stale
    derived file can never be read beside a new export."""
    for path in sorted(Path(out).iterdir()):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def export_onnx_if_changed(
    bundle: str | Path, out: str | Path, *, tolerance: float = DEFAULT_TOLERANCE, log=print, warn=None
):
    """`export_onnx` unless `out` already holds the export of this very bundle; an export of another bundle is
    removed first, said through `warn` (its TensorRT plans and int8 UNet then follow the new graphs). Returns the
    export's report, or None when the one in `out` was kept."""
    out = Path(out)
    current, made_from = export_is_current(bundle, out)
    if current:
        log(f"{out}: the export of this bundle ({made_from}) is up to date")
        return None
    if made_from is not None:
        (warn or log)(
            f"{out} holds the export of another bundle ({made_from}): the mounted bundle changed, exporting it "
            "again (its TensorRT plans and int8 UNet are made again from the new graphs)"
        )
        clear_export(out)
    return export_onnx(bundle, out, tolerance=tolerance, log=log)


def export_onnx(
    bundle: str | Path,
    out: str | Path,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    log=print,
    external_data_above: int = EXTERNAL_DATA_ABOVE,
) -> dict:
    """Export every component of `bundle` into `out/<component>.onnx` (weights above `external_data_above` bytes
    in `<component>.onnx.data`) and check each one's parity; returns the report. One component is in memory at a
    time: loaded, exported, checked against ONNX Runtime, then freed before the next is loaded."""
    import torch

    info = check_bundle(bundle)
    if info.trained_with_guidance_token and not info.has_image_encoder:
        log(
            f"warning: {info.path} was finetuned with the guidance token but has no image_encoder/: the export "
            "cannot compute it, and clients asking for it automatically will be refused"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    img_size = _image_encoder_size(info)
    names = component_names(info)
    rows = {}
    for name in names:
        spec = SPECS[name]
        t0 = time.perf_counter()
        _, loaded = load_torch_modules(bundle, only=[name])
        module = loaded.pop(name)
        inputs = example_inputs(name, info, batch=2, image_encoder_size=img_size)
        args = tuple(torch.from_numpy(inputs[k]) for k in spec.inputs)
        target = out / f"{name}.onnx"
        # each graph is exported into a folder of its own: large models make the exporter write one file per
        # weight, and the names of two components' weights could collide in `out`
        with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}-") as tmp, torch.no_grad():
            raw = Path(tmp) / "export" / target.name
            raw.parent.mkdir()
            torch.onnx.export(
                module,
                args,
                str(raw),
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,  # the TorchScript exporter's graphs ran ~1.5x faster under ONNX Runtime here
            )
            _place_graph(raw, target, external_data_above)
        del args, inputs
        _free()
        size = sum(p.stat().st_size for p in graph_files(target))
        log(f"exported {name:<13} -> {target} ({size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s)")
        rows[name] = _component_parity(name, module, target, info, img_size, log)
        del module
        _free()
    meta = {
        "bundle": str(info.path),
        "bundle_identity": bundle_identity(info.path),
        "image_size": info.image_size,
        "latent_channels": info.latent_channels,
        "vae_scale_factor": info.vae_scale_factor,
        "vae_scaling_factor": _vae_scaling_factor(info),
        "text_hidden_size": info.text_hidden_size,
        "image_encoder_size": img_size if "image_encoder" in names else None,
        "trained_with_guidance_token": info.trained_with_guidance_token,
        "components": sorted(names),
        "opset": OPSET,
    }
    (out / "export.json").write_text(json.dumps(meta, indent=2))
    _copy_sampler_files(info.path, out)
    return _parity_report(rows, out, tolerance)


def _copy_sampler_files(bundle: Path, out: Path) -> None:
    """The server needs the tokenizer and scheduler config beside the graphs (no torch weights)."""
    for sub in ("tokenizer", "scheduler"):
        if (out / sub).exists():
            shutil.rmtree(out / sub)
        shutil.copytree(bundle / sub, out / sub)


def _component_parity(name: str, module, path: Path, info: BundleInfo, img_size: int, log=print) -> dict:
    """max |ONNX - PyTorch| of one component at each of its parity batches (None where the shapes differ)."""
    import torch

    session = _session(path)
    row = {}
    for batch in parity_batches(name):
        inputs = example_inputs(name, info, batch, seed=100 + batch, image_encoder_size=img_size)
        onnx_out = session.run(None, inputs)[0]
        with torch.no_grad():
            ref = module(*(torch.from_numpy(inputs[k]) for k in SPECS[name].inputs)).numpy()
        row[f"batch{batch}"] = float(np.max(np.abs(onnx_out - ref))) if onnx_out.shape == ref.shape else None
        if onnx_out.shape != ref.shape:
            row[f"batch{batch}_shapes"] = [list(onnx_out.shape), list(ref.shape)]
        del onnx_out, ref, inputs
    del session
    _free()
    worst = max((v for k, v in row.items() if k.startswith("batch") and isinstance(v, float)), default=0.0)
    log(f"parity {name:<13} max|ONNX-PyTorch| = {worst:.2e} (batch {', '.join(map(str, parity_batches(name)))})")
    return row


def _parity_report(rows: dict, onnx_dir: Path, tolerance: float) -> dict:
    """parity.json from the components' rows; ParityError naming each component above `tolerance`."""
    failures = []
    for name, row in rows.items():
        for key, value in row.items():
            if key.endswith("_shapes"):
                failures.append(f"{name}: shape {value[0]} != PyTorch {value[1]} at {key.removesuffix('_shapes')}")
        values = [v for k, v in row.items() if not k.endswith("_shapes") and v is not None]
        worst = max(values, default=0.0)
        if worst > tolerance or not np.isfinite(worst):
            failures.append(f"{name}: max |ONNX - PyTorch| = {worst:.3g} > tolerance {tolerance:g}")
    report = {
        "tolerance": tolerance,
        "components": {n: {k: v for k, v in r.items() if not k.endswith("_shapes")} for n, r in rows.items()},
        "ok": not failures,
    }
    (onnx_dir / "parity.json").write_text(json.dumps(report, indent=2))
    if failures:
        raise ParityError(f"ONNX parity failed ({'; '.join(failures)}); report: {onnx_dir / 'parity.json'}")
    return report


def check_parity(bundle: str | Path, onnx_dir: str | Path, *, tolerance: float = DEFAULT_TOLERANCE, log=print) -> dict:
    """max |ONNX - PyTorch| per component at its parity batches (PARITY_BATCHES), one component in memory at a
    time; writes parity.json; raises ParityError above the tolerance."""
    info = check_bundle(bundle)
    onnx_dir = Path(onnx_dir)
    img_size = _image_encoder_size(info)
    rows = {}
    for name in component_names(info):
        path = onnx_dir / f"{name}.onnx"
        if not path.is_file():
            raise UserError(f"{path} is missing: run `rf-export onnx` first")
        _, loaded = load_torch_modules(bundle, only=[name])
        rows[name] = _component_parity(name, loaded.pop(name), path, info, img_size, log)
        del loaded
        _free()
    return _parity_report(rows, onnx_dir, tolerance)
