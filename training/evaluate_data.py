"""`rf-train evaluate-data`: how close a synthetic set is to the real one, per class and overall, before any
classifier is trained on it: FID and KID (torchmetrics), precision/recall and density/coverage (prdc), and a
memorisation check (each synthetic image's cosine distance to its nearest real image; near-copies flagged).

Every number is computed on features from a local encoder, never downloaded: the bundle's CLIP image encoder
(`--bundle`), a classifier checkpoint from `rf-train classify` (`--classifier`), or a torchvision model with a
local weights file (`--torchvision NAME --weights FILE`). Each image is encoded once; the metrics then read the
features (torchmetrics is given a pass-through feature module, so no Inception network is involved).
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from realfake.core.classes import ClassInfo, load_classes
from realfake.core.dataset import iter_manifest, manifest_files
from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.core.real_folder import scan_real
from realfake.training.data import jsonable
from realfake.training.evaluate_data_config import EvaluateDataConfig
from realfake.training.image_batches import image_batches

METRICS = ("fid", "kid_mean", "precision", "recall", "density", "coverage", "near_copy_share")


# -- the two sets ---------------------------------------------------------------------------------------


def labelled_images(root: Path, classes: list[ClassInfo], option: str) -> dict[str, list[str]]:
    """Class id -> image paths relative to `root`: an rf-client output by its manifest rows, else an ImageFolder."""
    if not root.is_dir():
        raise UserError(f"{option} {root} is not a directory")
    if not manifest_files(root):
        return scan_real(root, classes, option)
    known = {c.id for c in classes}
    found: dict[str, list[str]] = {}
    for manifest in manifest_files(root):
        for row, _ in iter_manifest(manifest):
            if row["class_id"] not in known:
                raise UserError(f"{option} {root}: manifest class id {row['class_id']!r} is not in the class set")
            found.setdefault(row["class_id"], []).append(row["path"])
    return {cid: sorted(set(paths)) for cid, paths in found.items()}


# -- encoders -------------------------------------------------------------------------------------------


@dataclass
class Encoder:
    name: str
    module: torch.nn.Module  # [B,3,H,W] float -> [B,D]
    transform: Callable[[Image.Image], torch.Tensor]  # RGB image -> [3,H,W]


class _Head(torch.nn.Module):
    """A feature function as a module (so `.to(device)` and `eval()` reach its weights)."""

    def __init__(self, model: torch.nn.Module, fn: Callable):
        super().__init__()
        self.model, self.fn = model, fn

    def forward(self, x):
        return self.fn(self.model, x)


def _drop_classifier(model: torch.nn.Module) -> torch.nn.Module:
    """The network up to its penultimate features: its last Linear layer becomes the identity."""
    last = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not last:
        raise UserError("the model has no final Linear layer to take features before")
    parent_name, _, child = last[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, torch.nn.Identity())
    return model


def _load(path: Path, what: str):
    if not Path(path).is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure: not a checkpoint we can read
        raise UserError(f"{what} {path} is not a torch checkpoint ({type(exc).__name__})") from None


def bundle_encoder(bundle: Path) -> Encoder:
    from transformers import CLIPVisionModelWithProjection

    from realfake.core.images import clip_preprocess
    from realfake.serving.model_bundle import check_bundle, quiet_loading

    info = check_bundle(bundle)
    if not info.has_image_encoder:
        raise UserError(f"bundle {bundle} has no image_encoder: pass --classifier or --torchvision instead")
    quiet_loading()
    vision = CLIPVisionModelWithProjection.from_pretrained(Path(bundle) / "image_encoder", local_files_only=True)
    size = int(vision.config.image_size)
    return Encoder(
        f"bundle CLIP image encoder ({size} px, {vision.config.projection_dim}-d)",
        _Head(vision, lambda m, x: m(pixel_values=x).image_embeds),
        lambda im: torch.from_numpy(clip_preprocess(np.asarray(im)[None], size)[0]),
    )


def classifier_encoder(checkpoint: Path) -> Encoder:
    from realfake.training.classify import load_checkpoint

    loaded = load_checkpoint(checkpoint)
    return Encoder(
        f"classifier {loaded.config['model']} from {checkpoint} ({loaded.image_size} px)",
        _Head(_drop_classifier(loaded.model), lambda m, x: m(x)),
        loaded.transform,  # the validation transform it was scored with
    )


def torchvision_encoder(name: str, weights: Path) -> Encoder:
    import torchvision

    if name not in torchvision.models.list_models(torchvision.models):
        raise UserError(f"unknown torchvision model {name!r} (e.g. resnet50, vit_b_16, convnext_tiny)")
    state = _load(weights, "--weights")
    if isinstance(state, dict) and isinstance(state.get("state_dict", state.get("model")), dict):
        state = state.get("state_dict", state.get("model"))
    model = torchvision.models.get_model(name, weights=None)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"--weights {weights} do not fit torchvision {name}: {first}") from None
    # the preprocessing its published weights were trained with (a transform only: nothing is downloaded)
    transform = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    return Encoder(
        f"torchvision {name} from {weights}",
        _Head(_drop_classifier(model), lambda m, x: m(x)),
        lambda im: transform(im),
    )


def make_encoder(cfg: EvaluateDataConfig) -> Encoder:
    if cfg.bundle:
        return bundle_encoder(Path(cfg.bundle))
    if cfg.classifier:
        return classifier_encoder(Path(cfg.classifier))
    return torchvision_encoder(cfg.torchvision, Path(cfg.weights))


@torch.no_grad()
def encode(
    encoder: Encoder, root: Path, keys: list[str], cfg: EvaluateDataConfig, desc: str, log
) -> tuple[torch.Tensor, list[str], list[tuple[str, str]]]:
    """Features [N,D] (float32, CPU) of the images that decode, their keys, and (key, reason) of the rest."""
    from tqdm.auto import tqdm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = encoder.module.to(device).eval()
    feats, kept, unreadable = [], [], []
    bar = tqdm(total=len(keys), unit="img", desc=desc, disable=not sys.stderr.isatty(), leave=False)
    t0 = time.perf_counter()
    for batch in image_batches(root, keys, cfg.batch_size, cfg.workers):
        unreadable += batch.unreadable
        if batch.images:
            x = torch.stack([encoder.transform(im) for im in batch.images]).to(device)
            with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                feats.append(module(x).float().cpu())
            kept += batch.keys
        bar.update(len(batch.keys) + len(batch.unreadable))
    bar.close()
    seconds = time.perf_counter() - t0
    log(f"{desc}: {len(kept)} images in {seconds:.1f} s ({len(kept) / max(seconds, 1e-9):.1f} images/sec)")
    if not feats:
        raise UserError(f"none of the {len(keys)} images under {root} decodes")
    return torch.cat(feats), kept, unreadable


# -- metrics --------------------------------------------------------------------------------------------


class PassThrough(torch.nn.Module):
    """torchmetrics' custom feature extractor: the rows it is given are already features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def distribution_metrics(real: torch.Tensor, fake: torch.Tensor, cfg: EvaluateDataConfig) -> dict:
    """FID, KID, precision, recall, density and coverage of one pair of feature sets."""
    from prdc import compute_prdc
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n_real, n_fake = len(real), len(fake)
    result: dict = {"real_images": n_real, "synthetic_images": n_fake}
    if min(n_real, n_fake) < 3:
        result["note"] = "fewer than 3 images in a set: no distribution metrics"
        return result
    features = PassThrough(real.shape[1])
    fid = FrechetInceptionDistance(feature=features)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    result["fid"] = max(0.0, float(fid.compute()))  # round-off can take identical sets a hair below 0
    # KID's cost is its subsets x three m x m kernels: float32, on the GPU when there is one
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kid = KernelInceptionDistance(feature=features, subsets=cfg.kid_subsets, subset_size=min(1000, n_real, n_fake))
    kid = kid.to(device)
    kid.update(real.to(device), real=True)
    kid.update(fake.to(device), real=False)
    torch.manual_seed(cfg.seed)  # KID draws its subsets from torch's generator
    kid_mean, kid_std = kid.compute()
    result["kid_mean"], result["kid_std"] = float(kid_mean), float(kid_std)
    rng = np.random.default_rng(cfg.seed)
    r, f = real.numpy(), fake.numpy()
    if n_real > cfg.prdc_max:
        r = r[np.sort(rng.choice(n_real, cfg.prdc_max, replace=False))]
    if n_fake > cfg.prdc_max:
        f = f[np.sort(rng.choice(n_fake, cfg.prdc_max, replace=False))]
    k = min(cfg.nearest_k, len(r) - 2, len(f) - 2)
    with contextlib.redirect_stdout(io.StringIO()):  # prdc prints the set sizes
        prdc = compute_prdc(r, f, k)
    result.update({name: float(value) for name, value in prdc.items()})
    result["nearest_k"] = k
    return result


def nearest_real(fake: torch.Tensor, real: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """For each synthetic row: cosine distance to its nearest real row and that row's index. Features are
    centred at the real mean first: pooled CNN features are all positive, and uncentred they all look alike."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mean = real.mean(0, keepdim=True)
    r = torch.nn.functional.normalize(real - mean, dim=1).to(device)
    dist, index = [], []
    for i in range(0, len(fake), chunk):
        f = torch.nn.functional.normalize(fake[i : i + chunk] - mean, dim=1).to(device)
        best = (f @ r.T).max(dim=1)
        dist.append((1 - best.values).clamp_min(0).cpu())
        index.append(best.indices.cpu())
    return torch.cat(dist), torch.cat(index)


# -- pictures -------------------------------------------------------------------------------------------


def _thumb(path: Path, size: int) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB").resize((size, size), Image.BICUBIC)
    except Exception:  # noqa: BLE001 - a picture of the report; the pair is still listed in the JSON
        return Image.new("RGB", (size, size), (128, 128, 128))


def pairs_picture(pairs: list[dict], real_root: Path, syn_root: Path, size: int = 128, per_row: int = 4) -> Image.Image:
    """Synthetic (left) | nearest real (right), side by side, closest pairs first, with their cosine distance."""
    rows = (len(pairs) + per_row - 1) // per_row
    cell_w, cell_h = 2 * size + 8, size + 18
    sheet = Image.new("RGB", (per_row * cell_w + 8, rows * cell_h + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for n, p in enumerate(pairs):
        x, y = 8 + (n % per_row) * cell_w, 4 + (n // per_row) * cell_h
        sheet.paste(_thumb(syn_root / p["synthetic"], size), (x, y))
        sheet.paste(_thumb(real_root / p["real"], size), (x + size, y))
        draw.text((x, y + size + 2), f"d={p['distance']:.4f} {p['class_id']}", fill="black")
    return sheet


def bar_charts(per_class: dict[str, dict], metrics=METRICS, width: int = 900, panel: int = 160) -> Image.Image:
    """One bar chart per metric, classes along x (names shown when there are few), stacked in one picture."""
    ids = list(per_class)
    sheet = Image.new("RGB", (width, panel * len(metrics)), "white")
    draw = ImageDraw.Draw(sheet)
    left, bottom, top = 60, 24, 18
    slot = (width - left - 10) / max(len(ids), 1)
    for m, metric in enumerate(metrics):
        y0 = m * panel
        values = [per_class[c].get(metric) for c in ids]
        finite = [v for v in values if isinstance(v, float) and np.isfinite(v)]
        high = max(finite, default=0.0) or 1.0
        draw.text((left, y0 + 2), f"{metric} per class (max {high:.4g})", fill="black")
        base = y0 + panel - bottom
        draw.line((left, base, width - 10, base), fill="black")
        for i, v in enumerate(values):
            if v is None or not np.isfinite(v):
                continue
            h = (panel - bottom - top) * max(v, 0.0) / high
            x = left + i * slot
            draw.rectangle((x + slot * 0.1, base - h, x + max(slot * 0.9, 1), base), fill=(70, 110, 180))
            if len(ids) <= 20:
                draw.text((x + 2, base + 4), ids[i][:10], fill="black")
                draw.text((x + slot * 0.1 + 2, max(base - h - 12, y0 + 14)), f"{v:.3g}", fill="black")
    return sheet


def markdown(report: dict) -> str:
    cols = ("real_images", "synthetic_images", *METRICS)

    def cell(v) -> str:
        return f"{v:.4f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = [
        "# Synthetic vs real data",
        "",
        f"Features: {report['encoder']}. Near-copy: cosine distance < {report['copy_threshold']} to a real image.",
        "",
        "| set | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
        "| **overall** | " + " | ".join(cell(report["overall"].get(c)) for c in cols) + " |",
    ]
    for cid, row in report["per_class"].items():
        lines.append(f"| {cid} ({row['name']}) | " + " | ".join(cell(row.get(c)) for c in cols) + " |")
    lines += ["", "Closest synthetic-real pairs (near_copies.png):", ""]
    lines += [f"- {p['synthetic']} ~ {p['real']}: {p['distance']:.4f}" for p in report["worst_pairs"]]
    return "\n".join(lines) + "\n"


# -- the run --------------------------------------------------------------------------------------------


def run_evaluate_data(cfg: EvaluateDataConfig, log=print) -> dict:
    """Compare the synthetic set with the real one; write evaluate.json, evaluate.md, per_class.png and
    near_copies.png under `cfg.out`, and return the report."""
    cfg.validate()
    t_start = time.perf_counter()
    classes = load_classes(cfg.classes)
    names = {c.id: c.name for c in classes}
    real_root, syn_root, out = Path(cfg.real), Path(cfg.synthetic), Path(cfg.out)
    # 1. the images of each set, by class
    real_map = labelled_images(real_root, classes, "--real")
    syn_map = labelled_images(syn_root, classes, "--synthetic")
    if cfg.per_class:
        real_map = {k: v[: cfg.per_class] for k, v in real_map.items()}
        syn_map = {k: v[: cfg.per_class] for k, v in syn_map.items()}
    shared = [c.id for c in classes if c.id in real_map and c.id in syn_map]
    if not shared:
        raise UserError(f"--real {real_root} and --synthetic {syn_root} have no class in common")
    only_real, only_syn = sorted(set(real_map) - set(shared)), sorted(set(syn_map) - set(shared))
    if only_real or only_syn:
        log(f"warning: classes only in the real set: {only_real or 'none'}; only synthetic: {only_syn or 'none'}")
    # 2. features, each image once
    encoder = make_encoder(cfg)
    log(f"features: {encoder.name}")
    real_keys = [k for cid in shared for k in real_map[cid]]
    syn_keys = [k for cid in shared for k in syn_map[cid]]
    real_f, real_kept, real_bad = encode(encoder, real_root, real_keys, cfg, "real", log)
    syn_f, syn_kept, syn_bad = encode(encoder, syn_root, syn_keys, cfg, "synthetic", log)
    for what, bad in (("real", real_bad), ("synthetic", syn_bad)):
        if bad:
            log(f"warning: {len(bad)} {what} image(s) did not decode and are left out: {bad[0][0]} ({bad[0][1]})")
    class_of = {k: cid for cid in shared for k in real_map[cid]}
    syn_class = {k: cid for cid in shared for k in syn_map[cid]}
    real_cls = np.array([class_of[k] for k in real_kept])
    syn_cls = np.array([syn_class[k] for k in syn_kept])
    t_features = time.perf_counter()
    # 3. memorisation: each synthetic image's nearest real image (over all classes)
    dist, index = nearest_real(syn_f, real_f)
    copies = dist < cfg.copy_threshold
    order = torch.argsort(dist)[: cfg.worst_pairs].tolist()
    worst = [
        {
            "synthetic": syn_kept[i],
            "real": real_kept[int(index[i])],
            "distance": float(dist[i]),
            "class_id": str(syn_cls[i]),
        }
        for i in order
    ]
    # 4. distribution metrics, overall and per class
    log(f"metrics: overall and {len(shared)} classes")
    overall = distribution_metrics(real_f, syn_f, cfg)
    overall.update(near_copy_share=float(copies.float().mean()), near_copies=int(copies.sum()))
    per_class = {}
    for cid in shared:
        r_sel, s_sel = torch.from_numpy(real_cls == cid), torch.from_numpy(syn_cls == cid)
        row = {"name": names[cid], **distribution_metrics(real_f[r_sel], syn_f[s_sel], cfg)}
        row.update(near_copy_share=float(copies[s_sel].float().mean()), near_copies=int(copies[s_sel].sum()))
        per_class[cid] = row
    # 5. the report
    report = {
        "encoder": encoder.name,
        "feature_dim": int(real_f.shape[1]),
        "copy_threshold": cfg.copy_threshold,
        "real": {"path": str(real_root), "images": len(real_kept), "unreadable": [k for k, _ in real_bad]},
        "synthetic": {"path": str(syn_root), "images": len(syn_kept), "unreadable": [k for k, _ in syn_bad]},
        "classes_only_real": only_real,
        "classes_only_synthetic": only_syn,
        "overall": overall,
        "per_class": per_class,
        "worst_pairs": worst,
        "seconds": {
            "features": round(t_features - t_start, 2),
            "metrics": round(time.perf_counter() - t_features, 2),
        },
        "config": jsonable(asdict(cfg)),
    }
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "evaluate.json", json.dumps(report, indent=1).encode())
    write_atomic(out / "evaluate.md", markdown(report).encode())
    bar_charts(per_class).save(out / "per_class.png")
    if worst:
        pairs_picture(worst, real_root, syn_root).save(out / "near_copies.png")
    o = overall
    log(
        f"overall: FID {o.get('fid', float('nan')):.4f}, KID {o.get('kid_mean', float('nan')):.5f}, "
        f"precision {o.get('precision', float('nan')):.3f}, recall {o.get('recall', float('nan')):.3f}, "
        f"density {o.get('density', float('nan')):.3f}, coverage {o.get('coverage', float('nan')):.3f}, "
        f"near-copies {o['near_copies']}/{len(syn_kept)} -> {out / 'evaluate.json'}"
    )
    return report
