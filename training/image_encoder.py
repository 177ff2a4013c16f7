"""`rf-train add-image-encoder`: give a base bundle the CLIP image encoder the guidance token needs.

Stable Diffusion 1.5 ships no `image_encoder/`; the paper's guidance token is the CLIP ViT-L/14 image embedding
of the real image, projected to the text encoder's width (768 for SD-1.5) and put in place of the last text
token. This reads a local CLIP checkpoint (a `CLIPVisionModelWithProjection`, or a whole `CLIPModel` such as a
copy of openai/clip-vit-large-patch14, whose vision tower and projection are taken), checks that every weight of
the tower was found and that the projection width is the text encoder's, and writes the bundle with
`image_encoder/` added, as diffusers' StableDiffusionPipeline reads it (model_index.json names it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from realfake.core.defaults import ADD_IMAGE_ENCODER
from realfake.core.errors import UserError
from realfake.core.files import link_or_copy, write_atomic
from realfake.serving.model_bundle import check_bundle

COMMAND = ADD_IMAGE_ENCODER


def load_vision_tower(encoder: Path):
    """The CLIP vision tower with its projection from a local directory, refusing any weight it lacks."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config_path = encoder / "config.json"
    if not config_path.is_file():
        raise UserError(f"--image-encoder {encoder} has no config.json (expected a local CLIP checkpoint directory)")
    raw = json.loads(config_path.read_text())
    if raw.get("model_type") not in ("clip", "clip_vision_model"):
        raise UserError(
            f"--image-encoder {encoder} is a {raw.get('model_type')!r} model; a CLIP model (model_type clip or "
            "clip_vision_model, e.g. a local copy of openai/clip-vit-large-patch14) is needed"
        )
    config = CLIPVisionConfig.from_pretrained(encoder, local_files_only=True)
    if raw.get("model_type") == "clip":  # a whole CLIPModel: the projection width is the top-level one
        config.projection_dim = int(raw.get("projection_dim", config.projection_dim))
    model, info = CLIPVisionModelWithProjection.from_pretrained(
        encoder, config=config, local_files_only=True, output_loading_info=True
    )
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    if missing:
        raise UserError(
            f"--image-encoder {encoder}: {len(missing)} weights of the vision tower are not in the checkpoint "
            f"(e.g. {missing[0]}); they would be random"
        )
    return model.eval()


def add_image_encoder(bundle: Path, encoder: Path, out: Path, log: Callable[[str], None] = print) -> dict:
    """Write `out`: `bundle` with `image_encoder/` from `encoder`. Its files are hard-linked, not copied (a copy
    where links cannot be made); `out` may be `bundle` itself, to add the encoder in place."""
    bundle, encoder, out = Path(bundle), Path(encoder), Path(out)
    info = check_bundle(bundle)
    if info.has_image_encoder:
        raise UserError(f"--bundle {bundle} already has an image_encoder/; nothing to add")
    model = load_vision_tower(encoder)
    width = int(model.config.projection_dim)
    if width != info.text_hidden_size:
        raise UserError(
            f"--image-encoder {encoder} projects to {width}, the text encoder of {bundle} is {info.text_hidden_size} "
            "wide: the guidance token replaces a text token, so they must match (SD-1.5: CLIP ViT-L/14, 768)"
        )
    in_place = out.resolve() == bundle.resolve()
    if not in_place:
        if out.exists() and any(out.iterdir()):
            raise UserError(f"--out {out} exists and is not empty")
        for src in sorted(p for p in bundle.rglob("*") if p.is_file()):
            rel = src.relative_to(bundle)
            if rel.as_posix() != "model_index.json":
                link_or_copy(src, out / rel)
    model.save_pretrained(out / "image_encoder", safe_serialization=True)
    index = json.loads((bundle / "model_index.json").read_text())
    index["image_encoder"] = ["transformers", "CLIPVisionModelWithProjection"]
    write_atomic(out / "model_index.json", (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
    check_bundle(out)
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"{out}: image_encoder/ added ({n_params / 1e6:.1f} M parameters, {model.config.image_size} px input, "
        f"projection {width}); finetune and generation now use the guidance token"
    )
    return {"bundle": str(out), "image_encoder_parameters": n_params, "projection_dim": width}
