"""`rf-demo`: the whole Real-Fake loop on Fashion-MNIST, offline, on CPU, with every number measured in the run.

base model (trained here, cached) -> Real-Fake finetune -> ONNX + Triton repository -> local Triton ->
rf-client generate (one synthetic image per real image: caption-free class prompt, latent prior, guidance
token) -> the same classifier trained on real only / synthetic only / real+synthetic -> evaluated on the real
test images; the synthetic set's FID/KID, precision/recall and near-copies against the real one -> a table
(JSON + Markdown) and a real-vs-synthetic grid.

Each stage records its result in OUT/stages/<stage>.json; a re-run skips finished stages and resumes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from realfake.core.classes import load_classes
from realfake.core.defaults import DEFAULT_GUIDANCE_SCALE, DEFAULT_STEPS
from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.training.demo_report import DATA_METRICS, write_report
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
        self.class_set = CLASS_SET
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
        bar = _Bar(self.log, "base")
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

    def generate(self, url: str, gen: Generation) -> dict:
        """One synthetic set through the client's Python API against the local Triton at `url`."""
        from realfake.client.generate import GenerateConfig, generate_dataset

        out = self.out / gen.target
        cfg = GenerateConfig(
            classes=CLASS_SET,
            out=out,
            urls=[url],
            steps=self.cfg.steps,
            guidance_scale=self.cfg.guidance_scale,
            seed=self.cfg.seed,
            batch=8,
            concurrency=2,
        )
        if gen.conditioned:
            cfg.real, cfg.versions, cfg.strength = self.out / "real_train", 1, self.cfg.strength
            cfg.guidance_token = "on" if gen.guidance_token else "off"
        else:
            cfg.per_class = self.cfg.per_class
        bar = _Bar(self.log, "images of")
        summary = generate_dataset(
            cfg,
            log=lambda m: self.log("  " + m),
            progress=lambda done, failed, total, _: bar.update(gen.target, done + failed, max(total, 1)),
        )
        if summary.failed:
            raise UserError(f"{summary.failed} images failed (see {summary.path}); re-run to retry them")
        return {
            "dataset": str(out),
            "images": summary.images + summary.skipped,
            "images_per_sec": summary.images_per_sec,
        }

    def classify(self, c: Classifier, s: dict) -> dict:
        from realfake.training.classify import ClassifyConfig, run_classify

        synthetic = s[c.synthetic]["dataset"] if c.synthetic else None

        cfg = ClassifyConfig(
            classes=CLASS_SET,
            val=self.out / "real_test",
            out=self.out / "classify" / c.name,
            synthetic=Path(synthetic) if synthetic else None,
            real=self.out / "real_train" if c.real else None,
            model=self.cfg.model,
            epochs=self.cfg.epochs,
            batch_size=64,
            lr=0.05,
            seed=self.cfg.seed,
            eval_every=self.cfg.epochs,
        )
        result = run_classify(cfg, log=lambda m: self.log("  " + m))
        return {"top1": result["top1"], "top5": result["top5"], "train_images": result["train"]["total_images"]}

    def evaluate_data(self, s: dict) -> dict:
        """The synthetic set against the real images it was conditioned on, on the features of the real-only
        classifier (a trained encoder: random-weight features crowd every image together)."""
        from realfake.training.evaluate_data import EvaluateDataConfig, run_evaluate_data

        cfg = EvaluateDataConfig(
            real=self.out / "real_train",
            synthetic=Path(s["generate"]["dataset"]),
            out=self.out / "evaluate_data",
            classes=CLASS_SET,
            classifier=self.out / "classify" / "real" / "best.pt",
            seed=self.cfg.seed,
        )
        report = run_evaluate_data(cfg, log=lambda m: self.log("  " + m))
        return {
            "encoder": report["encoder"],
            "report": str(cfg.out / "evaluate.json"),
            **{k: report["overall"].get(k) for k in DATA_METRICS},
        }

    # -- the run --------------------------------------------------------------------------------------------

    def run(self) -> dict:
        from realfake.client.server import LocalServer

        self.check_settings()
        started = time.perf_counter()
        s = {}
        # 1-4. real data, base model, finetune, export (the base model's export too, for the ablations)
        s["data"] = self.stage("data", "1/8", self.data)
        s["base"] = self.stage("base", "2/8", self.base)
        s["finetune"] = self.stage("finetune", "3/8", lambda: self.finetune(s["base"]["bundle"]))
        s["export"] = self.stage("export", "4/8", lambda: self.export(s["finetune"]["merged_bundle"], "finetuned"))
        if self.cfg.ablate:
            s["export_base"] = self.stage("export_base", "4/8", lambda: self.export(s["base"]["bundle"], "base"))
        # 5. the synthetic sets, one local Triton per served model
        generations = GENERATIONS + (ABLATION_GENERATIONS if self.cfg.ablate else ())
        for model in dict.fromkeys(g.model for g in generations):
            mine = [g for g in generations if g.model == model]
            if all((self.stages_dir / f"{g.stage}.json").is_file() for g in mine):
                for g in mine:
                    s[g.stage] = self.stage(g.stage, "5/8", dict)
                continue
            repo = s[EXPORT_STAGE[model]]["repo"]
            try:
                server = LocalServer(repo, http_port=self.cfg.http_port).start()
            except UserError as exc:
                raise UserError(f"stage generate failed: {exc} (re-run to resume from this stage)") from exc
            try:
                self.log(f"  local Triton serving {repo} at {server.url}")
                for g in mine:
                    s[g.stage] = self.stage(g.stage, "5/8", lambda g=g, url=server.url: self.generate(url, g))
            finally:
                server.stop()
        # 6-7. the same classifier on each training set, evaluated on the real test images
        classifiers = CLASSIFIERS + (ABLATION_CLASSIFIERS if self.cfg.ablate else ())
        for c in classifiers:
            number = "7/8" if c in ABLATION_CLASSIFIERS else "6/8"
            s[c.stage] = self.stage(c.stage, number, lambda c=c: self.classify(c, s))
        # 8. how close the synthetic set is to the real one, then the table and the grid
        s["evaluate_data"] = self.stage("evaluate_data", "8/8", lambda: self.evaluate_data(s))
        labels = [(c.label, c.stage) for c in classifiers]
        if self.cfg.ablate:
            labels.append(("ablation: + guidance token (= Real-Fake)", "classify_synthetic"))
        return self.stage("report", "8/8", lambda: write_report(self, labels, s, time.perf_counter() - started))


@dataclass(frozen=True)
class Generation:
    """A synthetic set the demo makes: which model's export serves it and how its images are conditioned."""

    stage: str
    model: str  # "finetuned" or "base"
    target: str  # its folder under OUT
    conditioned: bool  # latent prior from a real training image
    guidance_token: bool  # that real image's CLIP embedding as the last text token


@dataclass(frozen=True)
class Classifier:
    """A classifier the demo trains: its report label, and its training data (a synthetic set and/or the real)."""

    stage: str
    label: str
    synthetic: str | None  # the Generation stage whose set it trains on
    real: bool

    @property
    def name(self) -> str:
        return self.stage.removeprefix("classify_")


EXPORT_STAGE = {"finetuned": "export", "base": "export_base"}
GENERATIONS = (Generation("generate", "finetuned", "synthetic", conditioned=True, guidance_token=True),)
ABLATION_GENERATIONS = (
    Generation("generate_base_text", "base", "synthetic_base_text", conditioned=False, guidance_token=False),
    Generation("generate_finetuned_text", "finetuned", "synthetic_finetuned_text", False, False),
    Generation("generate_prior_no_token", "finetuned", "synthetic_prior_no_token", True, False),
)
CLASSIFIERS = (
    Classifier("classify_real", "real only", None, real=True),
    Classifier("classify_synthetic", "synthetic only (Real-Fake)", "generate", real=False),
    Classifier("classify_mixed", "real + synthetic", "generate", real=True),
)
ABLATION_CLASSIFIERS = (
    Classifier("classify_base_text", "ablation: text-only, base model", "generate_base_text", False),
    Classifier("classify_finetuned_text", "ablation: text-only, + finetune", "generate_finetuned_text", False),
    Classifier(
        "classify_prior_no_token", "ablation: + latent prior (no guidance token)", "generate_prior_no_token", False
    ),
)


class StageFailed(Exception):
    """A stage raised an internal error; the message names the stage."""


class _Bar:
    """Logs the progress of long work every 10 %: the base model's training steps, a set's images."""

    def __init__(self, log, what: str):
        self.log, self.what, self.last = log, what, {}

    def update(self, stage: str, step: int, total: int, loss: float | None = None) -> None:
        tenth = step * 10 // total
        if self.last.get(stage) != tenth:
            self.last[stage] = tenth
            tail = f", loss {loss:.4f}" if loss is not None else ""
            self.log(f"  {self.what} {stage}: {step}/{total}{tail}")
