"""`rf-demo`: the whole Real-Fake loop on Fashion-MNIST, offline, on CPU, with every number measured in the run;
or the same loop on your own data: `--real DIR` (an ImageFolder), `--bundle BASE` (a base model to finetune instead
of training one here), `--captioner DIR` (captions for the real images, used in the finetune and the prompts).

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
from realfake.core.real_folder import scan_real
from realfake.training.demo_report import DATA_METRICS, write_report
from realfake.training.idx import DEBIAN_DIR, balanced_subset, load_split, write_imagefolder

CLASS_SET = "fashion-mnist"
BASE_SIZE = 32  # the side of the images the small base model trains on (its VAE's sample size x 2)
# how the demo's Triton runs the models (the names of `rf-export repo --runtime`): python-ort (ONNX Runtime fp32,
# exact), or openvino with --precision fp32, bf16 or int8 (the UNet quantized on the class prompts first)
RUNTIMES = {"python-ort": ("auto", "fp32"), "openvino": ("auto", "fp32", "bf16", "int8")}


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
    runtime: str = "python-ort"  # RUNTIMES
    precision: str = "auto"  # one of RUNTIMES[runtime]; auto: fp32 (the CPU)
    http_port: int | None = None
    # your own data instead of Fashion-MNIST: an ImageFolder of real images (the classes are its folder names); the
    # test images are held out from it unless `real_test` (an ImageFolder of the same classes) is given
    real: Path | None = None
    real_test: Path | None = None
    bundle: Path | None = None  # a base bundle to finetune: no base model is trained here
    captioner: Path | None = None  # a local image-to-text model (rf-train caption): captions in the prompts
    # out-of-distribution: the first `ood_per_class` test images of each class with each of ImageNet-C's 15
    # corruptions at `ood_severity` (rf-train corrupt), scored by every classifier beside the clean test set
    ood_per_class: int = 100  # 0: no corrupted set
    ood_severity: int = 3
    # more synthetic data: the Real-Fake set is made with max(scaling) versions of each real image, and the
    # synthetic-only and real + synthetic classifiers are trained on the first k versions for each k (same epochs)
    scaling: tuple[int, ...] = ()

    def base_key(self) -> str:
        """Identity of the cached base model: what it was trained on and how."""
        data = [str(self.real.resolve()), self.per_class] if self.real else [str(self.fmnist)]
        text = json.dumps([*data, self.base_vae_steps, self.base_unet_steps, self.seed, 1])
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def run_key(self) -> dict:
        d = asdict(self)
        key = {k: str(v) if isinstance(v, Path) else v for k, v in d.items() if k not in ("out", "http_port")}
        return json.loads(json.dumps(key))  # as demo.json reads back (tuples become lists)


def check_own_data(root: Path, classes: list, has_test_set: bool) -> dict[str, list[str]]:
    """`--real DIR` can make a demo: two classes or more (a classifier of one class measures nothing), and in
    each class one image to train on and, unless --real-test is given, one to hold out for the test set. Checked
    before any stage runs, so a folder that cannot make a demo is refused in a second, not after the base model
    has trained for minutes."""
    if len(classes) < 2:
        raise UserError(
            f"--real {root} holds {len(classes)} class folder(s); the demo compares classifiers, which needs at "
            "least 2 classes (one folder per class)"
        )
    by_class = scan_real(root, classes)
    need = 1 if has_test_set else 2
    short = [(c.id, len(by_class.get(c.id, []))) for c in classes if len(by_class.get(c.id, [])) < need]
    if short:
        listed = ", ".join(f"{cid!r} has {n}" for cid, n in short[:5]) + (", ..." if len(short) > 5 else "")
        raise UserError(
            f"--real {root}: {len(short)} class(es) have fewer than {need} images ({listed}); each needs one to "
            "train on" + ("" if has_test_set else " and one to hold out for the test set (or give --real-test DIR)")
        )
    return by_class


class Demo:
    def __init__(self, cfg: DemoConfig, cache: Path, log: Callable[[str], None] = print):
        self.cfg, self.cache, self.log = cfg, cache, log
        self.out = Path(cfg.out)
        self.stages_dir = self.out / "stages"
        # your ImageFolder is the class set (its folder names), as `--classes DIR` is everywhere
        self.class_set = str(Path(cfg.real).resolve()) if cfg.real else CLASS_SET
        self.classes = load_classes(self.class_set)
        self.val_dir = Path(cfg.real_test) if cfg.real_test else self.out / "real_test"

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
    def own_images(self) -> dict[str, list[str]]:
        """`--real`'s images by class, once checked to make a demo (check_own_data)."""
        return check_own_data(Path(self.cfg.real), self.classes, bool(self.cfg.real_test))

    @cached_property
    def train_split(self) -> tuple[np.ndarray, np.ndarray]:
        """Fashion-MNIST's training split, read once per run (the data and base stages both need it)."""
        return load_split(self.cfg.fmnist, "train")

    def data(self) -> dict:
        if self.cfg.real:
            return self.own_data()
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

    def own_data(self) -> dict:
        """Your ImageFolder: `per_class` images of each class to OUT/real_train (seeded pick), and unless
        `real_test` is given, up to test_images / classes of the others to OUT/real_test."""
        root, per = Path(self.cfg.real), self.cfg.per_class
        by_class = self.own_images
        held_out = 0 if self.cfg.real_test else max(1, self.cfg.test_images // len(self.classes))
        rng = np.random.default_rng(self.cfg.seed)
        train = test = 0
        for c in self.classes:
            files = by_class[c.id]
            order = rng.permutation(len(files))
            n_train = min(per, len(files) - min(held_out, 1))
            picks = {"real_train": order[:n_train], "real_test": order[n_train : n_train + held_out]}
            for split, chosen in picks.items():
                for k in chosen:
                    _place(root / files[k], self.out / split / c.id / Path(files[k]).name)
            train, test = train + n_train, test + len(picks["real_test"])
        if self.cfg.real_test:
            test = sum(len(v) for v in scan_real(Path(self.cfg.real_test), self.classes, "--real-test").values())
        return {"real_train": train, "real_test": test, "source": str(root)}

    def base(self) -> dict:
        from realfake.training.pretrain import pretrain_base

        if self.cfg.bundle:
            from realfake.serving.model_bundle import check_bundle

            check_bundle(self.cfg.bundle)  # one line when it is not a usable bundle
            self.log(f"  base model: {self.cfg.bundle} (given; none is trained here)")
            return {"bundle": str(Path(self.cfg.bundle).resolve()), "cached": False, "given": True}
        bundle = self.cache / f"base-{self.cfg.base_key()}" / "bundle"
        if (bundle / "model_index.json").is_file():
            self.log(f"  reusing the cached base model {bundle}")
            return {"bundle": str(bundle), "cached": True}
        images, labels = self.own_train_arrays() if self.cfg.real else self.train_split
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

    def own_train_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """OUT/real_train as uint8 [N,32,32,3] and labels: what the small base model trains on."""
        from PIL import Image

        images, labels = [], []
        for c in self.classes:
            for path in sorted((self.out / "real_train" / c.id).iterdir()):
                with Image.open(path) as im:
                    images.append(np.asarray(im.convert("RGB").resize((BASE_SIZE, BASE_SIZE), Image.BICUBIC)))
                labels.append(c.index)
        return np.stack(images), np.asarray(labels)

    def caption(self) -> dict:
        """Captions of the real training images by `captioner` (rf-train caption), for the finetune and prompts."""
        from realfake.training.caption import CaptionConfig, run_caption

        out = self.out / "captions.jsonl"
        run_caption(
            CaptionConfig(real=self.out / "real_train", model=Path(self.cfg.captioner), out=out),
            log=lambda m: self.log("  " + m),
        )
        return {"captions": str(out), "captioner": str(self.cfg.captioner)}

    def finetune(self, base_bundle: str, captions: str | None = None) -> dict:
        from realfake.training.finetune import FinetuneConfig, run_finetune

        cfg = FinetuneConfig(
            bundle=Path(base_bundle),
            real=self.out / "real_train",
            out=self.out / "finetune",
            classes=self.class_set,
            captions=Path(captions) if captions else None,
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
        if self.cfg.runtime == "python-ort":
            write_repository(onnx_dir, repo)
            return result
        dtype = self.cfg.precision
        result["precision"] = dtype
        if dtype == "int8":
            from realfake.core.defaults import DEFAULT_NEGATIVE
            from realfake.export.quantize import class_prompts, quantize_unet

            prompts = class_prompts(self.class_set)
            check = quantize_unet(
                onnx_dir,
                onnx_dir,
                prompts,
                DEFAULT_NEGATIVE,
                calibration_images=len(prompts),
                steps=self.cfg.steps,
                guidance_scale=self.cfg.guidance_scale,
                log=lambda m: self.log("  " + m),
            )["check"]
            result["int8_mean_abs_pixel_diff"] = check["mean_abs_pixel_diff"]
        write_repository(onnx_dir, repo, runtime="openvino", precision=dtype)
        return result

    def generate(self, url: str, gen: Generation, captions: str | None = None) -> dict:
        """One synthetic set through the client's Python API against the local Triton at `url`."""
        from realfake.client.generate import GenerateConfig, generate_dataset

        out = self.out / gen.target
        cfg = GenerateConfig(
            classes=self.class_set,
            out=out,
            urls=[url],
            steps=self.cfg.steps,
            guidance_scale=self.cfg.guidance_scale,
            seed=self.cfg.seed,
            batch_size=8,
            concurrency=2,
        )
        if gen.conditioned:
            versions = max(self.cfg.scaling or (1,)) if gen.stage == "generate" else 1
            cfg.real, cfg.versions, cfg.strength = self.out / "real_train", versions, self.cfg.strength
            cfg.captions = Path(captions) if captions else None
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

    def corrupt(self) -> dict:
        """The corrupted test set: OUT/real_test_c/<corruption>/<severity>/, one ImageFolder each."""
        from realfake.training.corrupt import CorruptConfig, run_corrupt

        cfg = CorruptConfig(
            real=self.val_dir,
            out=self.out / "real_test_c",
            severities=(self.cfg.ood_severity,),
            image_format="png",
            seed=self.cfg.seed,
            limit_per_class=self.cfg.ood_per_class,
        )
        summary = run_corrupt(cfg, log=lambda m: self.log("  " + m))
        return {"root": str(cfg.out), "images": summary["images"], "sets": summary["sets"]}

    def ood_sets(self) -> dict[str, Path]:
        """The corrupted sets' validation names and folders (none when the demo makes none)."""
        path = self.stages_dir / "corrupt.json"
        if not self.cfg.ood_per_class or not path.is_file():
            return {}
        done = json.loads(path.read_text())
        return {name: Path(done["root"]) / rel for name, rel in done["sets"].items()}

    def classify(self, c: Classifier, s: dict) -> dict:
        from realfake.training.classify import ClassifyConfig, run_classify

        synthetic = s[c.synthetic]["dataset"] if c.synthetic else None
        ood = self.ood_sets()

        cfg = ClassifyConfig(
            classes=self.class_set,
            val=[f"test={self.val_dir}", *(f"{name}={path}" for name, path in ood.items())],
            out=self.out / "classify" / c.name,
            synthetic=Path(synthetic) if synthetic else None,
            versions=c.versions if c.synthetic == "generate" and self.cfg.scaling else None,
            real=self.out / "real_train" if c.real else None,
            model=self.cfg.model,
            epochs=self.cfg.epochs,
            batch_size=64,
            lr=0.05,
            seed=self.cfg.seed,
            eval_every=self.cfg.epochs,
        )
        result = run_classify(cfg, log=lambda m: self.log("  " + m))
        row = {"top1": result["top1"], "top5": result["top5"], "train_images": result["train"]["total_images"]}
        if ood:
            per = {name: result["val"][name]["top1"] for name in ood}
            mean = sum(per.values()) / len(per)
            row["ood"] = {"corrupted_top1": mean, "drop": result["top1"] - mean, "per_corruption": per}
        return row

    def membership(self) -> dict:
        """Membership inference against the real-only and the synthetic-only classifiers: members are the real
        training images (which the real-only classifier saw, and which the synthetic set was made from), non-members
        as many held-out test images of each class."""
        from realfake.training.membership import MembershipConfig, run_membership

        out = {}
        for c in CLASSIFIERS[:2]:
            cfg = MembershipConfig(
                classifier=self.out / "classify" / c.name / "best.pt",
                members=self.out / "real_train",
                non_members=self.val_dir,
                classes=self.class_set,
                out=self.out / "membership" / c.name,
                per_class=self.cfg.per_class,
                seed=self.cfg.seed,
            )
            r = run_membership(cfg, log=lambda m: self.log("  " + m))
            out[c.label] = {k: r[k] for k in ("auc", "tpr_at_1pct_fpr", "members", "non_members")}
        return {"attacks": out}

    def evaluate_data(self, s: dict) -> dict:
        """The synthetic set against the real images it was conditioned on, on the features of the real-only
        classifier (a trained encoder: random-weight features crowd every image together)."""
        from realfake.training.evaluate_data import EvaluateDataConfig, run_evaluate_data

        cfg = EvaluateDataConfig(
            real=self.out / "real_train",
            synthetic=Path(s["generate"]["dataset"]),
            out=self.out / "evaluate_data",
            classes=self.class_set,
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

        if self.cfg.real:
            self.own_images  # noqa: B018 - checked before any stage (and the folder scanned once)
        self.check_settings()
        started = time.perf_counter()
        s = {}
        # 1-4. real data, base model, finetune, export (the base model's export too, for the ablations)
        s["data"] = self.stage("data", "1/8", self.data)
        if self.cfg.ood_per_class:
            s["corrupt"] = self.stage("corrupt", "1/8", self.corrupt)
        s["base"] = self.stage("base", "2/8", self.base)
        captions = None
        if self.cfg.captioner:
            s["caption"] = self.stage("caption", "3/8", self.caption)
            captions = s["caption"]["captions"]
        s["finetune"] = self.stage("finetune", "3/8", lambda: self.finetune(s["base"]["bundle"], captions))
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
                    s[g.stage] = self.stage(g.stage, "5/8", lambda g=g, url=server.url: self.generate(url, g, captions))
            finally:
                server.stop()
        # 6-7. the same classifier on each training set, evaluated on the real test images
        classifiers = CLASSIFIERS + (ABLATION_CLASSIFIERS if self.cfg.ablate else ()) + scaling_classifiers(self.cfg)
        for c in classifiers:
            number = "7/8" if c in ABLATION_CLASSIFIERS else "6/8"
            s[c.stage] = self.stage(c.stage, number, lambda c=c: self.classify(c, s))
        # 8. how close the synthetic set is to the real one, how much each classifier gives away of the real
        # training images (membership inference), then the table and the grid
        s["evaluate_data"] = self.stage("evaluate_data", "8/8", lambda: self.evaluate_data(s))
        s["membership"] = self.stage("membership", "8/8", self.membership)
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
    versions: int = 1  # of each real image of its synthetic set (the scaling rows: more)

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


def scaling_classifiers(cfg: DemoConfig) -> tuple[Classifier, ...]:
    """The scaling rows: synthetic only and real + synthetic on k versions of each real image, for each k > 1."""
    rows = []
    for k in sorted(set(cfg.scaling) - {1}):
        rows.append(Classifier(f"classify_synthetic_{k}x", f"synthetic only, {k}x", "generate", False, k))
        rows.append(Classifier(f"classify_mixed_{k}x", f"real + synthetic, {k}x", "generate", True, k))
    return tuple(rows)


def _place(source: Path, target: Path) -> None:
    """A real image in the run directory: a hard link where the file system allows it, else a copy."""
    import os
    import shutil

    if target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


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
