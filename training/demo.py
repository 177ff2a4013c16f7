"""`rf-demo`: the whole Real-Fake loop on Fashion-MNIST, offline, on CPU, with every number measured in the run.

base model (trained here, cached) -> Real-Fake finetune -> ONNX + Triton repository -> local Triton ->
rf-client generate (one synthetic image per real image: caption-free class prompt, latent prior, guidance
token) -> the same classifier trained on real only / synthetic only / real+synthetic -> evaluated on the real
test images -> a table (JSON + Markdown) and a real-vs-synthetic grid.

Each stage records its result in OUT/stages/<stage>.json; a re-run skips finished stages and resumes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from realfake.core.classes import load_classes
from realfake.core.dataset import read_manifest_rows
from realfake.core.defaults import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS
from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.training.idx import DEBIAN_DIR, balanced_subset, load_split, write_imagefolder

CLASS_SET = "fashion-mnist"
# how the demo's Triton runs the models: ONNX Runtime fp32 (exact), or OpenVINO (fp32, bf16, int8 UNet)
RUNTIMES = ("onnxruntime", "openvino-fp32", "openvino-bf16", "openvino-int8")


@dataclass
class DemoConfig:
    out: Path = Path("out/realfake-demo")
    fmnist: Path = DEBIAN_DIR
    per_class: int = 100  # real training images per class (the finetune, conditioning and real-only sets)
    test_images: int = 10000  # real test images evaluated on (the whole Fashion-MNIST test split by default)
    base_vae_steps: int = 150
    base_unet_steps: int = 500
    finetune_steps: int = 100
    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    # The paper's 0.75 assumes a strong pretrained SD; this demo's base model trains for minutes on CPU and cannot
    # rebuild an image from 75 % noise, so it keeps more of the real image (measured: README, issue notes).
    strength: float = 0.5
    epochs: int = 15
    model: str = "resnet-small"
    ablate: bool = False
    seed: int = 0
    runtime: str = "onnxruntime"
    http_port: int | None = None

    def base_key(self) -> str:
        """Identity of the cached base model: what it was trained on and how."""
        text = json.dumps([str(self.fmnist), self.base_vae_steps, self.base_unet_steps, self.seed, 1])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def run_key(self) -> dict:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items() if k not in ("out", "http_port")}


class Demo:
    def __init__(self, cfg: DemoConfig, cache: Path, log: Callable[[str], None] = print):
        self.cfg, self.cache, self.log = cfg, cache, log
        self.out = Path(cfg.out)
        self.stages_dir = self.out / "stages"
        self.classes = load_classes(CLASS_SET)

    # -- stage bookkeeping ----------------------------------------------------------------------------------

    def stage(self, name: str, number: str, fn: Callable[[], dict]) -> dict:
        marker = self.stages_dir / f"{name}.json"
        if marker.is_file():
            result = json.loads(marker.read_text())
            self.log(f"[{number}] {name}: done in an earlier run ({result['wall_seconds']:.0f}s), skipped")
            return result
        self.log(f"[{number}] {name} ...")
        t0 = time.perf_counter()
        try:
            result = fn()
        except UserError as exc:
            raise UserError(f"stage {name} failed: {exc} (re-run to resume from this stage)") from exc
        except Exception as exc:  # noqa: BLE001 - reported with the stage's name; --debug shows the traceback
            first = (str(exc).strip().splitlines() or [""])[0]
            raise StageFailed(f"stage {name} failed: {type(exc).__name__}: {first} (re-run to resume)") from exc
        result["wall_seconds"] = round(time.perf_counter() - t0, 2)
        self.stages_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(marker, json.dumps(result, indent=1).encode())
        self.log(f"[{number}] {name}: {result['wall_seconds']:.0f}s")
        return result

    def check_settings(self) -> None:
        path = self.out / "demo.json"
        key = self.cfg.run_key()
        if path.is_file() and json.loads(path.read_text()) != key:
            raise UserError(f"{self.out} holds a demo run with other settings: use another --out, or --fresh")
        self.out.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(key, indent=1).encode())

    # -- stages ---------------------------------------------------------------------------------------------

    @cached_property
    def train_split(self) -> tuple[np.ndarray, np.ndarray]:
        """Fashion-MNIST's training split, read once per run (the data and base stages both need it)."""
        return load_split(self.cfg.fmnist, "train")

    def data(self) -> dict:
        images, labels = self.train_split
        test_images, test_labels = load_split(self.cfg.fmnist, "test")
        picked = balanced_subset(labels, self.cfg.per_class, seed=self.cfg.seed)
        write_imagefolder(images, labels, self.classes, self.out / "real_train", picked)
        n_test = min(self.cfg.test_images, len(test_images))
        test_pick = (
            np.arange(len(test_images))
            if n_test == len(test_images)
            else balanced_subset(test_labels, n_test // len(self.classes), seed=self.cfg.seed)
        )
        write_imagefolder(test_images, test_labels, self.classes, self.out / "real_test", test_pick)
        return {"real_train": len(picked), "real_test": len(test_pick), "train_pool": len(images)}

    def base(self) -> dict:
        from realfake.training.pretrain import pretrain_base

        bundle = self.cache / f"base-{self.cfg.base_key()}" / "bundle"
        if (bundle / "model_index.json").is_file():
            self.log(f"  reusing the cached base model {bundle}")
            return {"bundle": str(bundle), "cached": True}
        images, labels = self.train_split
        bundle.parent.mkdir(parents=True, exist_ok=True)
        bar = _Bar(self.log)
        pretrain_base(
            images,
            labels,
            self.classes,
            bundle,
            vae_steps=self.cfg.base_vae_steps,
            unet_steps=self.cfg.base_unet_steps,
            seed=self.cfg.seed,
            log=lambda m: self.log("  " + m),
            progress=bar.update,
        )
        return {"bundle": str(bundle), "cached": False}

    def finetune(self, base_bundle: str) -> dict:
        from realfake.training.finetune import FinetuneConfig, run_finetune

        cfg = FinetuneConfig(
            bundle=Path(base_bundle),
            data=self.out / "real_train",
            out=self.out / "finetune",
            classes=CLASS_SET,
            max_steps=self.cfg.finetune_steps,
            batch_size=16,
            lr=1e-3,
            checkpoint_every=50,
            seed=self.cfg.seed,
        )
        return run_finetune(cfg, log=lambda m: self.log("  " + m))

    def export(self, bundle: str, name: str) -> dict:
        from realfake.export.onnx_export import export_onnx
        from realfake.export.triton_repo import write_repository

        onnx_dir, repo = self.out / f"onnx_{name}", self.out / f"repo_{name}"
        report = export_onnx(bundle, onnx_dir, log=lambda m: self.log("  " + m))
        worst = max(v for row in report["components"].values() for v in row.values())
        result = {"repo": str(repo), "parity_max_abs": worst, "runtime": self.cfg.runtime}
        if self.cfg.runtime == "onnxruntime":
            write_repository(onnx_dir, repo)
            return result
        dtype = self.cfg.runtime.removeprefix("openvino-")
        if dtype == "int8":
            from realfake.core.defaults import DEFAULT_NEGATIVE
            from realfake.export.quantize import class_prompts, quantize_unet

            prompts = class_prompts(CLASS_SET)
            check = quantize_unet(
                onnx_dir,
                prompts,
                DEFAULT_NEGATIVE,
                calibration_images=len(prompts),
                steps=self.cfg.steps,
                guidance_scale=self.cfg.guidance_scale,
                log=lambda m: self.log("  " + m),
            )["check"]
            result["int8_mean_abs_pixel_diff"] = check["mean_abs_pixel_diff"]
        write_repository(onnx_dir, repo, runtime="openvino", dtype=dtype)
        return result

    def generate(self, url: str, target: str, conditioned: bool, token: bool) -> dict:
        out = self.out / target
        cmd = [
            sys.executable,
            "-m",
            "realfake.client.cli",
            "generate",
            "--classes",
            CLASS_SET,
            "--out",
            str(out),
            "--url",
            url,
            "--steps",
            str(self.cfg.steps),
            "--guidance",
            str(self.cfg.guidance),
            "--seed",
            str(self.cfg.seed),
            "--batch",
            "8",
            "--concurrency",
            "2",
        ]
        if conditioned:
            cmd += [
                "--real",
                str(self.out / "real_train"),
                "--versions",
                "1",
                "--strength",
                str(self.cfg.strength),
                "--guidance-token",
                "on" if token else "off",
            ]
        else:
            cmd += ["--per-class", str(self.cfg.per_class)]
        result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"rf-client generate: {last}")
        summary = json.loads((out / "summary.json").read_text())
        return {
            "dataset": str(out),
            "images": summary["images"] + summary["skipped_already_done"],
            "images_per_sec": summary["images_per_sec"],
        }

    def classify(self, name: str, synthetic: str | None, real: bool) -> dict:
        from realfake.training.classify import ClassifyConfig, run_classify

        cfg = ClassifyConfig(
            classes=CLASS_SET,
            val=self.out / "real_test",
            out=self.out / "classify" / name,
            synthetic=Path(synthetic) if synthetic else None,
            real=self.out / "real_train" if real else None,
            model=self.cfg.model,
            epochs=self.cfg.epochs,
            batch_size=64,
            lr=0.05,
            seed=self.cfg.seed,
            eval_every=self.cfg.epochs,
        )
        result = run_classify(cfg, log=lambda m: self.log("  " + m))
        return {"top1": result["top1"], "top5": result["top5"], "train_images": result["train"]["total_images"]}

    # -- the run --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        from realfake.client.server import LocalServer

        self.check_settings()
        started = time.perf_counter()
        s = {}
        s["data"] = self.stage("data", "1/8", self.data)
        s["base"] = self.stage("base", "2/8", self.base)
        s["finetune"] = self.stage("finetune", "3/8", lambda: self.finetune(s["base"]["bundle"]))
        s["export"] = self.stage("export", "4/8", lambda: self.export(s["finetune"]["merged_bundle"], "finetuned"))
        if self.cfg.ablate:
            s["export_base"] = self.stage("export_base", "4/8", lambda: self.export(s["base"]["bundle"], "base"))
        gen_stages = {"generate": ("finetuned", "synthetic", True, True)}
        if self.cfg.ablate:
            gen_stages |= {
                "generate_base_text": ("base", "synthetic_base_text", False, False),
                "generate_finetuned_text": ("finetuned", "synthetic_finetuned_text", False, False),
                "generate_prior_no_token": ("finetuned", "synthetic_prior_no_token", True, False),
            }
        pending = [k for k in gen_stages if not (self.stages_dir / f"{k}.json").is_file()]
        for repo_name in dict.fromkeys(gen_stages[k][0] for k in gen_stages):
            names = [k for k in gen_stages if gen_stages[k][0] == repo_name]
            if not any(k in pending for k in names):
                for k in names:
                    s[k] = self.stage(k, "5/8", dict)
                continue
            repo = s["export" if repo_name == "finetuned" else "export_base"]["repo"]
            try:
                server = LocalServer(repo, http_port=self.cfg.http_port).start()
            except UserError as exc:
                raise UserError(f"stage generate failed: {exc} (re-run to resume from this stage)") from exc
            try:
                self.log(f"  local Triton serving {repo} at {server.url}")
                for k in names:
                    _, target, conditioned, token = gen_stages[k]
                    s[k] = self.stage(
                        k, "5/8", lambda u=server.url, t=target, c=conditioned, tk=token: self.generate(u, t, c, tk)
                    )
            finally:
                server.stop()
        s["classify_real"] = self.stage("classify_real", "6/8", lambda: self.classify("real", None, True))
        s["classify_synthetic"] = self.stage(
            "classify_synthetic", "6/8", lambda: self.classify("synthetic", s["generate"]["dataset"], False)
        )
        s["classify_mixed"] = self.stage(
            "classify_mixed", "6/8", lambda: self.classify("mixed", s["generate"]["dataset"], True)
        )
        if self.cfg.ablate:
            for k in ("generate_base_text", "generate_finetuned_text", "generate_prior_no_token"):
                name = "classify_" + k.removeprefix("generate_")
                s[name] = self.stage(name, "7/8", lambda k=k: self.classify(k, s[k]["dataset"], False))
        report = self.stage("report", "8/8", lambda: self.report(s, time.perf_counter() - started))
        return report

    def report(self, s: dict, wall: float) -> dict:
        real, syn = s["classify_real"], s["classify_synthetic"]
        labels = [
            ("real only", "classify_real"),
            ("synthetic only (Real-Fake)", "classify_synthetic"),
            ("real + synthetic", "classify_mixed"),
        ]
        if self.cfg.ablate:
            labels += [
                ("ablation: text-only, base model", "classify_base_text"),
                ("ablation: text-only, + finetune", "classify_finetuned_text"),
                ("ablation: + latent prior (no guidance token)", "classify_prior_no_token"),
                ("ablation: + guidance token (= Real-Fake)", "classify_synthetic"),
            ]
        rows = [{"data": label, **{k: s[key][k] for k in ("train_images", "top1", "top5")}} for label, key in labels]
        stage_times = {k: v["wall_seconds"] for k, v in s.items()}
        table = {
            "class_set": CLASS_SET,
            "classifier": self.cfg.model,
            "epochs": self.cfg.epochs,
            "test_images": s["data"]["real_test"],
            "rows": rows,
            "synthetic_over_real_top1": syn["top1"] / real["top1"] if real["top1"] else None,
            "generation_images_per_sec": s["generate"]["images_per_sec"],
            "stage_seconds": stage_times,
            "wall_seconds_this_run": round(wall, 1),
            "settings": self.cfg.run_key(),
        }
        write_atomic(self.out / "results.json", json.dumps(table, indent=1).encode())
        write_atomic(self.out / "results.md", markdown(table).encode())
        grid = self.grid(Path(s["generate"]["dataset"]))
        self.log("\n" + markdown(table))
        self.log(f"results: {self.out / 'results.json'}, {self.out / 'results.md'}, grid: {grid}")
        return {"results": str(self.out / "results.json"), "grid": str(grid)}

    def grid(self, synthetic: Path, per: int = 4) -> Path:
        """Rows = classes; pairs of columns = a real image and the synthetic image conditioned on it."""
        from PIL import Image

        rows = read_manifest_rows(synthetic / "manifest.jsonl")
        by_class: dict[str, list[dict]] = {}
        for r in sorted(rows, key=lambda r: r["index"]):
            by_class.setdefault(r["class_id"], []).append(r)
        tiles = []
        for c in self.classes:
            row_tiles = []
            for r in by_class.get(c.id, [])[:per]:
                real = Image.open(self.out / "real_train" / r["real_image"]).convert("RGB").resize((32, 32))
                fake = Image.open(synthetic / r["path"]).convert("RGB").resize((32, 32))
                row_tiles += [np.asarray(real), np.asarray(fake), np.full((32, 4, 3), 255, np.uint8)]
            if row_tiles:
                tiles.append(np.concatenate(row_tiles, axis=1))
        width = max(t.shape[1] for t in tiles)
        tiles = [np.pad(t, ((0, 0), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
        image = Image.fromarray(np.concatenate(tiles, axis=0))
        path = self.out / "real_vs_synthetic.png"
        image.resize((image.width * 3, image.height * 3), Image.NEAREST).save(path)
        return path


class StageFailed(Exception):
    """A stage raised an internal error; the message names the stage."""


def markdown(table: dict) -> str:
    lines = [
        f"Fashion-MNIST, {table['classifier']} x {table['epochs']} epochs, top-1 on {table['test_images']} real "
        "test images",
        "",
        "| training data | images | top-1 | top-5 |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['data']} | {r['train_images']} | {r['top1']:.4f} | {r['top5']:.4f} |" for r in table["rows"]]
    ratio = table["synthetic_over_real_top1"]
    lines += [
        "",
        f"synthetic / real top-1: **{ratio:.3f}**" if ratio is not None else "synthetic / real top-1: n/a",
        f"generation: {table['generation_images_per_sec']:.2f} images/sec (rf-client -> local Triton, CPU)",
        "",
        "| stage | seconds |",
        "|---|---:|",
    ]
    lines += [f"| {k} | {v:.1f} |" for k, v in table["stage_seconds"].items()]
    return "\n".join(lines) + "\n"


class _Bar:
    """Prints training progress of the base model every 10 %."""

    def __init__(self, log):
        self.log, self.last = log, {}

    def update(self, stage: str, step: int, total: int, loss: float) -> None:
        tenth = step * 10 // total
        if self.last.get(stage) != tenth:
            self.last[stage] = tenth
            self.log(f"  base {stage}: step {step}/{total}, loss {loss:.4f}")
