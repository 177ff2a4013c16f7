"""The model bundle contract: a diffusers-layout Stable Diffusion directory, checked, identified and loaded
here. A real user passes a local Stable Diffusion 1.x copy; tests and demos build a tiny one
(`realfake.export.tiny_bundle`). No stage knows which it got.

`load_torch_modules` gives the bundle's modules as torch wrappers whose signatures are the graph contracts every
runtime serves (ONNX export traces them; the pytorch runtime runs them directly).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from realfake.core.errors import UserError
from realfake.core.files import file_sha256, rf_home, write_atomic

REQUIRED_COMPONENTS = ("unet", "text_encoder", "tokenizer", "vae", "scheduler")


OPTIONAL_COMPONENTS = ("image_encoder",)

# what `rf-train finetune` records about how it trained the bundle it writes
TRAINING_RECORD = "realfake.json"


TEXT_MAX_LENGTH = 77


@dataclass(frozen=True)
class BundleInfo:
    path: Path
    has_image_encoder: bool
    image_size: int  # pixels per side the UNet was built for
    latent_channels: int
    vae_scale_factor: int
    text_hidden_size: int
    # finetuned with the guidance token (realfake.json): served without an image encoder it is not the model
    # that was trained
    trained_with_guidance_token: bool = False


@dataclass(frozen=True)
class TrainingRecord:
    """`realfake.json` in a bundle `rf-train finetune` wrote: what serving must know about how it was trained."""

    guidance_token: bool  # each image's CLIP image embedding replaced the last conditional text token
    image_encoder_size: int | None  # the CLIP input side those embeddings were computed at
    merge_scale: float  # the LoRA scale fused into the UNet
    lora_rank: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def read(cls, bundle: Path) -> TrainingRecord | None:
        """The bundle's record, None when it has none; a malformed one is a UserError."""
        path = bundle / TRAINING_RECORD
        if not path.is_file():
            return None
        try:
            raw = json.loads(path.read_text())
            return cls(**{f.name: raw[f.name] for f in fields(cls)})
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"bundle {bundle}: {TRAINING_RECORD} is malformed ({exc!r})") from None


def check_bundle(path: str | Path) -> BundleInfo:
    """Validate the directory layout and the widths that later stages rely on; raise UserError otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise UserError(f"bundle {root} is not a directory (expected a diffusers-layout model folder)")
    if not (root / "model_index.json").is_file():
        raise UserError(f"bundle {root} has no model_index.json (is it a diffusers-format directory?)")
    missing = [c for c in REQUIRED_COMPONENTS if not (root / c).is_dir()]
    if missing:
        raise UserError(f"bundle {root} is missing component(s): {', '.join(missing)}")
    configs = {}
    for name, fname in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json")):
        cfg = root / name / fname
        if not cfg.is_file():
            raise UserError(f"bundle {root}: {name}/{fname} is missing")
        configs[name] = json.loads(cfg.read_text())
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    vae_scale = 2 ** (len(vae.get("block_out_channels", [1])) - 1)
    has_image_encoder = (root / "image_encoder" / "config.json").is_file()
    if has_image_encoder:
        proj = json.loads((root / "image_encoder" / "config.json").read_text()).get("projection_dim")
        if proj != text["hidden_size"]:
            raise UserError(
                f"bundle {root}: image_encoder projection_dim {proj} != text hidden size {text['hidden_size']}"
                " (the guidance token replaces a text token, so the widths must match)"
            )
    record = TrainingRecord.read(root)
    return BundleInfo(
        path=root,
        has_image_encoder=has_image_encoder,
        image_size=int(unet["sample_size"]) * vae_scale,
        latent_channels=int(unet["in_channels"]),
        vae_scale_factor=vae_scale,
        text_hidden_size=int(text["hidden_size"]),
        trained_with_guidance_token=bool(record and record.guidance_token),
    )


def bundle_identity(path: str | Path) -> str:
    """A short content hash of exactly the files the pipeline loads (`bundle_files`): the model identity the
    manifest records. A file's digest is cached by its (path, size, mtime, ctime, inode) in this user's cache
    (RF_HOME), not in the bundle, which may be read-only: an unchanged bundle is not read again."""
    root = Path(path).resolve()
    cache_path = rf_home() / "bundle-digests" / f"{hashlib.sha256(str(root).encode()).hexdigest()[:16]}.json"
    try:
        cached = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cached = {}
    digests, digest = {}, hashlib.sha256()
    for f in bundle_files(root):
        rel = f.relative_to(root).as_posix()
        st = f.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
        hit = cached.get(rel)
        sha = hit[1] if hit and hit[0] == stamp else file_sha256(f)
        digests[rel] = [stamp, sha]
        digest.update(f"{rel}:{sha}\n".encode())
    if digests != cached:
        with contextlib.suppress(OSError):  # an unwritable cache only costs a re-read next time
            write_atomic(cache_path, json.dumps(digests).encode())
    return digest.hexdigest()[:16]


def bundle_files(root: Path) -> list[Path]:
    """The files loading the bundle reads: model_index.json, realfake.json, and in each component folder the
    project uses (REQUIRED_COMPONENTS, and image_encoder/ when present) its configs and tokenizer files
    (*.json, *.txt) and the weights `from_pretrained` picks: the plain (no variant such as .fp16) safetensors
    files, or .bin files when there are none. Anything else (.ckpt leftovers, variants, other formats) is left out."""
    files = [root / name for name in ("model_index.json", TRAINING_RECORD) if (root / name).is_file()]
    for component in REQUIRED_COMPONENTS + OPTIONAL_COMPONENTS:
        folder = root / component
        if not folder.is_dir():
            continue
        present = sorted(p for p in folder.iterdir() if p.is_file())
        weights = {ext: [p for p in present if _plain_weights(p.name, ext)] for ext in (".safetensors", ".bin")}
        chosen = ".safetensors" if weights[".safetensors"] else ".bin"
        for p in present:
            if p in weights[chosen] or _plain_weights_index(p.name, chosen):
                files.append(p)
            elif p.suffix in (".json", ".txt") and ".index." not in p.name:  # not another format's shard list
                files.append(p)
    return sorted(files)


def _plain_weights(name: str, ext: str) -> bool:
    """`<base>.safetensors` (base may carry a shard suffix), not a variant `<base>.fp16.safetensors`."""
    return name.endswith(ext) and "." not in name[: -len(ext)]


def _plain_weights_index(name: str, ext: str) -> bool:
    """`<base>.safetensors.index.json`: the shard list of plain sharded weights."""
    suffix = f"{ext}.index.json"
    return name.endswith(suffix) and "." not in name[: -len(suffix)]


def quiet_loading() -> None:
    """Loading a local bundle needs no per-shard progress bars from transformers/diffusers."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()
    dlog.disable_progress_bar()


def component_names(info: BundleInfo) -> list[str]:
    """The graphs a bundle exports to, in export order (the image encoder only where the bundle has one)."""
    return ["text_encoder", "unet", "vae_decoder", "vae_encoder"] + (
        ["image_encoder"] if info.has_image_encoder else []
    )


def load_torch_modules(bundle: str | Path, only: tuple[str, ...] | list[str] | None = None) -> tuple[BundleInfo, dict]:
    """The bundle's modules as small torch wrappers whose signatures are the graph contracts above. `only`: load
    just these components (the export holds one at a time: SD-1.5's UNet alone is 3.4 GB in fp32)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    info = check_bundle(bundle)
    root = info.path
    wanted = set(component_names(info) if only is None else only)
    quiet_loading()
    try:
        unet = (
            UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True).eval()
            if "unet" in wanted
            else None
        )
        vae = (
            AutoencoderKL.from_pretrained(root / "vae", local_files_only=True).eval()
            if wanted & {"vae_decoder", "vae_encoder"}
            else None
        )
        text = (
            CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval()
            if "text_encoder" in wanted
            else None
        )
        vision = (
            CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder", local_files_only=True).eval()
            if info.has_image_encoder and "image_encoder" in wanted
            else None
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"bundle {root}: could not load weights ({exc})") from exc
    scaling = float(vae.config.scaling_factor) if vae is not None else 1.0

    class TextEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.text = text

        def forward(self, input_ids):
            return self.text(input_ids=input_ids).last_hidden_state

    class Unet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet

        def forward(self, sample, timestep, encoder_hidden_states):
            return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, latents):
            return self.vae.decode(latents / scaling, return_dict=False)[0]

    class VaeEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vae = vae

        def forward(self, image):
            moments = self.vae.encoder(image)
            if self.vae.quant_conv is not None:
                moments = self.vae.quant_conv(moments)
            return moments

    class ImageEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = vision

        def forward(self, pixel_values):
            return self.vision(pixel_values=pixel_values).image_embeds

    build = {
        "text_encoder": TextEncoder,
        "unet": Unet,
        "vae_decoder": VaeDecoder,
        "vae_encoder": VaeEncoder,
        "image_encoder": ImageEncoder,
    }
    modules = {name: build[name]().eval() for name in component_names(info) if name in wanted}
    return info, modules
