"""What a CPU server needs in memory, from an export's own files: the resident base (the graphs' weights as ONNX
Runtime or OpenVINO hold them, and one VAE slice at full image size) and the memory of each image in a sampler
call (the UNet's activations for both guidance halves). The repository writer turns a budget into the largest
batch one sampler call may take, so the default configuration cannot be killed by the kernel's out-of-memory
killer, which on Linux ends a process before Python ever sees a MemoryError.

The constants were measured at SD-1.5 shapes (512 px, python-ort, BLS) on this project's 2-core, 24 GB
workstation with bench/sd15_bench.py: the server's processes held 8.66 GB (PSS) ready, 14.88 GB after one image
and 23.06 GB after a batch of two (README, "The real model's size"). An image's cost is the UNet's attention
scores over the 64 x 64 latent for both guidance halves, which grow with the square of the latent's area, so the
per-image constant is per squared latent pixel; the base grows with the graphs' weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from realfake.core.errors import UserError
from realfake.serving.export_files import graph_files, load_export_meta

# resident bytes per byte of graph weights when ready: (8.66 GB - the processes - one VAE slice) / 5.48 GB of graphs
WEIGHT_FACTOR = 1.05
# bytes per image of one sampler call, per squared latent pixel: (23.06 - 14.88) GB / (64 * 64) ** 2
UNET_BYTES_PER_SQUARED_LATENT_PIXEL = 488.0
# VAE activation bytes per image pixel and channel of its widest full-resolution block, for one image
VAE_BYTES_PER_PIXEL_CHANNEL = 24.0
# what each Python-backend process holds before any model (Python, torch, ONNX Runtime)
PROCESS_BYTES = 0.35e9
SAFETY = 0.85  # the share of a budget planned for; the rest is left to the allocator's fragmentation


@dataclass(frozen=True)
class ServerMemory:
    base_bytes: float  # resident with no request
    per_image_bytes: float  # added by each image of one sampler call

    def images_within(self, budget_bytes: float) -> int:
        """The largest sampler batch whose memory stays within `budget_bytes` (0 when not even one image fits)."""
        room = budget_bytes * SAFETY - self.base_bytes
        return max(0, int(room // self.per_image_bytes)) if self.per_image_bytes > 0 else 1 << 16

    def at(self, images: int) -> float:
        return self.base_bytes + images * self.per_image_bytes


def _first_dim(graph: Path, suffix: str, axis: int) -> int | None:
    """A dimension of the first weight whose name ends with `suffix` (read without the external weights)."""
    import onnx

    model = onnx.load(str(graph), load_external_data=False)
    for init in model.graph.initializer:
        if init.name.endswith(suffix) and len(init.dims) > axis:
            return int(init.dims[axis])
    return None


def server_memory(
    onnx_dir: str | Path, components: list[str] | None = None, processes: int | None = None
) -> ServerMemory:
    """The memory model of a CPU server of the export in `onnx_dir` (all its graphs loaded; `processes`: how many
    Python-backend processes hold them, default one per graph plus the pipeline)."""
    onnx_dir = Path(onnx_dir)
    meta = load_export_meta(onnx_dir)
    names = components or list(meta["components"])
    weights = sum(p.stat().st_size for n in names for p in graph_files(onnx_dir / f"{n}.onnx"))
    side = int(meta["image_size"])
    latent = side // int(meta["vae_scale_factor"])
    vae_channels = _first_dim(onnx_dir / "vae_decoder.onnx", "conv_out.weight", 1) or 128
    vae_one = VAE_BYTES_PER_PIXEL_CHANNEL * side * side * vae_channels
    base = WEIGHT_FACTOR * weights + PROCESS_BYTES * (processes or len(names) + 1) + vae_one
    return ServerMemory(base, UNET_BYTES_PER_SQUARED_LATENT_PIXEL * (latent * latent) ** 2)


CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


def machine_memory(limits: tuple[Path, ...] = CGROUP_LIMITS) -> int:
    """What a server here may use at the most, in bytes: the physical memory, or the container's memory limit
    (cgroup v2 or v1: a Kubernetes `limits.memory`) where that is lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in limits:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            return min(physical, int(text))
    return physical


def images_per_run(onnx_dir: str | Path, budget_bytes: float, processes: int | None = None) -> int:
    """The images one sampler call may take within `budget_bytes`; UserError naming the need when none fits."""
    model = server_memory(onnx_dir, processes=processes)
    images = model.images_within(budget_bytes)
    if images < 1:
        raise UserError(
            f"the model needs about {model.at(1) / 1e9:.1f} GB to sample one image on a CPU server, more than the "
            f"memory budget of {budget_bytes / 1e9:.1f} GB allows: raise --memory-budget, or serve it on a GPU"
        )
    return images
