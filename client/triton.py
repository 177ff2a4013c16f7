"""A small typed client of the `pipeline` model over Triton's HTTP protocol (tritonclient)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from realfake.core.errors import UserError
from realfake.core.protocol import (
    PARAM_BUNDLE_IDENTITY,
    PARAM_ENGINE,
    PARAM_HAS_IMAGE_ENCODER,
    PARAM_IMAGE_SIZE,
    PARAM_TRAINED_WITH_GUIDANCE_TOKEN,
    PIPELINE_INPUTS,
    PIPELINE_MODEL,
)


@dataclass(frozen=True)
class ModelCard:
    """What a server says about the model it serves."""

    url: str
    identity: str
    image_size: int
    has_image_encoder: bool
    max_batch_size: int
    engine: str = "unknown"
    trained_with_guidance_token: bool = False  # finetuned with it (realfake.json): served without it, it is missing


def normalise_url(url: str) -> str:
    url = url.strip()
    for prefix in ("http://", "https://"):
        if url.startswith(prefix):
            url = url[len(prefix) :]
    url = url.rstrip("/")
    host, _, port = url.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(f"--url {url!r} must be HOST:PORT with a port in 1..65535 (Triton's HTTP port is 8000)")
    return url


class PipelineClient:
    def __init__(self, url: str, timeout: float = 900.0):
        import tritonclient.http as httpclient

        self._http = httpclient
        self.url = url
        self.client = httpclient.InferenceServerClient(
            url, connection_timeout=10.0, network_timeout=timeout, concurrency=1
        )

    def card(self) -> ModelCard:
        """Probe the server and its pipeline model; raise UserError when either is not usable."""
        try:
            live = self.client.is_server_ready()
        except Exception as exc:  # noqa: BLE001 - any transport failure means unreachable
            raise UserError(
                f"server {self.url} is unreachable ({type(exc).__name__}): is Triton running there?"
            ) from None
        if not live:
            raise UserError(f"server {self.url} answers but is not ready")
        if not self.client.is_model_ready(PIPELINE_MODEL):
            raise UserError(f"server {self.url} is up but model '{PIPELINE_MODEL}' is not ready (see the server's log)")
        config = self.client.get_model_config(PIPELINE_MODEL)
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        return ModelCard(
            url=self.url,
            identity=params.get(PARAM_BUNDLE_IDENTITY, "unknown"),
            image_size=int(params.get(PARAM_IMAGE_SIZE, "0") or 0),
            has_image_encoder=params.get(PARAM_HAS_IMAGE_ENCODER, "false") == "true",
            max_batch_size=int(config.get("max_batch_size", 0)),
            engine=params.get(PARAM_ENGINE, "unknown"),
            trained_with_guidance_token=params.get(PARAM_TRAINED_WITH_GUIDANCE_TOKEN, "false") == "true",
        )

    def _input(self, name: str, array: np.ndarray):
        tensor = self._http.InferInput(name, list(array.shape), PIPELINE_INPUTS[name][0])
        tensor.set_data_from_numpy(array, binary_data=True)
        return tensor

    def infer(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        inputs = [self._input(n, a) for n, a in arrays.items()]
        output = self._http.InferRequestedOutput("IMAGE", binary_data=True)
        result = self.client.infer(PIPELINE_MODEL, inputs, outputs=[output])
        return result.as_numpy("IMAGE")

    def generate(self, spec, items, init_images: np.ndarray | None = None) -> np.ndarray:
        """Images uint8 [B,H,W,3] for a batch of work items of one job."""
        n = len(items)
        arrays = {
            "PROMPT": np.array([[it.prompt.encode("utf-8")] for it in items], dtype=np.object_),
            "NEGATIVE_PROMPT": np.array([[spec.negative_prompt.encode("utf-8")]] * n, dtype=np.object_),
            "SEED": np.array([[it.seed] for it in items], dtype=np.int64),
            "STEPS": np.full((n, 1), spec.steps, dtype=np.int32),
            "GUIDANCE_SCALE": np.full((n, 1), spec.guidance_scale, dtype=np.float32),
        }
        if init_images is not None:
            arrays["INIT_IMAGE"] = init_images
            arrays["STRENGTH"] = np.full((n, 1), spec.strength, dtype=np.float32)
            arrays["GUIDANCE_TOKEN"] = np.full((n, 1), bool(spec.guidance_token), dtype=np.bool_)
        images = self.infer(arrays)
        if images.shape[0] != n:
            raise RuntimeError(f"server returned {images.shape[0]} images for {n} prompts")
        return images
