"""The real model's size on this machine: a bundle of SD-1.5's exact shapes (random weights, built from configs,
with a CLIP ViT-L/14 image encoder for the guidance token) through the stages one at a time, each stage's wall
time and peak resident memory (of its whole process tree, sampled) printed as a table and written as JSON.

Opt-in, not part of `make test`: the whole run takes tens of minutes on 2 cores and needs most of 24 GB. Run it
alone on the machine (a test run beside it changes both numbers).

Usage: python bench/sd15_bench.py --work DIR [--stages build,finetune,export,repo,serve] [--out sd15.json]
  build     the SD-1.5-shape bundle (DIR/bundle) and a small real ImageFolder (DIR/real)
  finetune  rf-train finetune, 2 steps, batch 1, guidance token
  export    rf-export onnx (one component in memory at a time; parity at batch 1 and 2 for UNet and VAE)
  repo      rf-export repo (python-ort)
  serve     rf-serve on the repository, its memory idle and after a conditioned request at each --batch-sizes
  quantize  (only when named) rf-export quantize: the int8 UNet for OpenVINO into DIR/onnx_int8 (2 calibration
            images, 1 checked, --steps steps)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import psutil

BIN = Path(sys.executable).parent
STAGES = ("build", "finetune", "export", "repo", "serve")  # and, asked by name: quantize


class PeakRss:
    """The peak memory of a process and all its descendants, sampled every `every` seconds: proportional set
    size (PSS), so pages the processes share (torch, ONNX Runtime, Python) count once, as the kernel counts them
    against the machine; summed RSS counts them once per process (6 Triton stubs: GBs too many)."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every, self.peak, self._stop = pid, every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> int:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_stage(name: str, argv: list[str], log: Path) -> dict:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
        rss = PeakRss(proc.pid)
        code = proc.wait()
    peak = rss.stop()
    row = {"stage": name, "seconds": round(time.perf_counter() - t0, 1), "peak_gb": round(peak / 1e9, 2)}
    row["exit"] = code
    if code != 0:
        row["error"] = (log.read_text().strip().splitlines() or ["no output"])[-1]
    print(f"{name:<9} {row['seconds']:>8.1f} s  peak {row['peak_gb']:6.2f} GB  exit {code}", flush=True)
    return row


def build(work: Path) -> list[str]:
    code = f"""
from pathlib import Path
import numpy as np
from PIL import Image
from realfake.export.tiny_bundle import build_sd15_shape_bundle
work = Path({str(work)!r})
build_sd15_shape_bundle(work / "bundle")
rng = np.random.default_rng(0)
for c in ("airplane", "cat"):
    (work / "real" / c).mkdir(parents=True, exist_ok=True)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)).save(work / "real" / c / f"{{i}}.png")
"""
    return [sys.executable, "-c", code]


def serve(work: Path, batches: list[int], steps: int) -> list[dict]:
    """rf-serve on the repository; its tree's memory idle, then after one conditioned request per batch size."""
    from realfake.client.server import free_port
    from realfake.client.triton import PipelineClient
    from realfake.core.images import load_real_image

    port = free_port()
    argv = [str(BIN / "rf-serve"), "--repo", str(work / "repo"), "--http-port", str(port), "--grpc-port", "0",
            "--metrics-port", "0"]  # fmt: skip
    rows = []
    t0 = time.perf_counter()
    with open(work / "serve.log", "w") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT)
        rss = PeakRss(proc.pid)
        try:
            client = PipelineClient(f"127.0.0.1:{port}")
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"rf-serve exited {proc.returncode}: see {work / 'serve.log'}")
                try:
                    card = client.card()
                    break
                except Exception:  # noqa: BLE001 - not ready yet
                    time.sleep(2)
            rows.append({"stage": "serve ready", "seconds": round(time.perf_counter() - t0, 1),
                         "peak_gb": round(rss.peak / 1e9, 2), "now_gb": round(rss.now() / 1e9, 2)})  # fmt: skip
            real = sorted((work / "real").rglob("*.png"))
            for b in batches:
                t1 = time.perf_counter()
                images = [load_real_image(real[i % len(real)], card.image_size) for i in range(b)]
                spec = SimpleNamespace(negative_prompt="blurry", steps=steps, guidance_scale=2.0, strength=0.75,
                                       guidance_token=card.has_image_encoder)  # fmt: skip
                items = [SimpleNamespace(prompt=f"photo of a cat, {i}", seed=i) for i in range(b)]
                client.generate(spec, items, np.stack(images))  # fmt: skip
                rows.append({"stage": f"serve batch {b}", "seconds": round(time.perf_counter() - t1, 1),
                             "peak_gb": round(rss.peak / 1e9, 2), "now_gb": round(rss.now() / 1e9, 2)})  # fmt: skip
                print(f"serve batch {b}: {rows[-1]}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
            rss.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="working directory (about 12 GB of files)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--batch-sizes", default="1,2,4", help="serve: images per request measured")
    ap.add_argument("--steps", type=int, default=4, help="serve: sampler steps (about 3 run at strength 0.75)")
    ap.add_argument("--memory-budget", help="repo: rf-export repo --memory-budget GB (default: the machine's)")
    ap.add_argument("--out", type=Path, default=Path("sd15-bench.json"))
    args = ap.parse_args()
    work, stages = args.work, [s for s in args.stages.split(",") if s]
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    commands = {
        "build": build(work),
        "finetune": [
            str(BIN / "rf-train"),
            "finetune",
            "--bundle",
            str(work / "bundle"),
            "--real",
            str(work / "real"),
            "--classes",
            "cifar10",
            "--out",
            str(work / "ft"),
            "--max-steps",
            "2",
            "--batch-size",
            "1",
            "--checkpoint-every",
            "2",
            "--guidance-token",
            "on",
        ],  # fmt: skip
        "export": [str(BIN / "rf-export"), "onnx", str(work / "bundle"), "--out", str(work / "onnx")],
        "quantize": [
            str(BIN / "rf-export"),
            "quantize",
            str(work / "onnx"),
            "--out",
            str(work / "onnx_int8"),
            "--calibration-images",
            "2",
            "--check-images",
            "1",
            "--steps",
            str(args.steps),
        ],  # fmt: skip
        "repo": [str(BIN / "rf-export"), "repo", str(work / "onnx"), "--out", str(work / "repo")]
        + (["--memory-budget", args.memory_budget] if args.memory_budget else []),
    }
    for stage in stages:
        if stage == "serve":
            rows += serve(work, [int(b) for b in args.batch_sizes.split(",")], args.steps)
        else:
            rows.append(run_stage(stage, commands[stage], work / f"{stage}.log"))
            if rows[-1]["exit"] != 0:
                print(f"{stage} failed: {rows[-1]['error']}", flush=True)
                break
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
