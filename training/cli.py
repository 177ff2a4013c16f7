"""`rf-train`: finetune a bundle with the Real-Fake objective; train and evaluate classifiers."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Annotated, Literal

import typer

from realfake.core.cli import (
    CpuPrecision,
    Debug,
    DemoRuntime,
    GuidanceToken,
    ImageFormat,
    PartialCaptions,
    Precision,
    int_list,
    make_app,
    run_cli,
)
from realfake.core.errors import UserError
from realfake.core.precision import AUTO_RULE
from realfake.training.caption import CaptionConfig
from realfake.training.classify_config import DEFAULTS, INTERPOLATIONS, RECIPES, ClassifyConfig
from realfake.training.classify_config import LR_SCHEDULES as CLASSIFY_LR_SCHEDULES
from realfake.training.demo import RUNTIMES, DemoConfig
from realfake.training.evaluate_data_config import EvaluateDataConfig
from realfake.training.finetune_config import LR_SCHEDULES, FinetuneConfig

FinetuneSchedule = Literal[LR_SCHEDULES]
ClassifyLrSchedule = Literal[CLASSIFY_LR_SCHEDULES]
ClassifyRecipe = Literal[tuple(RECIPES)]
Interpolation = Literal[INTERPOLATIONS]
EvalInterpolation = Literal[INTERPOLATIONS[:2]]


def _d(key: str) -> str:
    """A classify option's default when no --recipe sets it, for its help text."""
    return f"[default: {DEFAULTS[key]}, or the recipe's]"


app = make_app("Real-Fake training: distribution-matched LoRA finetuning, and classifiers on synthetic data.")


@app.callback()
def _root() -> None:
    """Real-Fake training: distribution-matched LoRA finetuning, and classifiers on synthetic data."""


@app.command()
def finetune(
    bundle: Annotated[Path, typer.Option(help="Base diffusers-layout bundle (local directory).")],
    real: Annotated[Path, typer.Option(help="Real ImageFolder: one folder per class (class id or name).")],
    classes: Annotated[
        str,
        typer.Option(help="Class set: imagenet, cifar10, cifar100, fashion-mnist, a class file, or an ImageFolder."),
    ],
    out: Annotated[Path, typer.Option(help="Run directory: lora/, bundle/, checkpoints/, metrics.jsonl.")],
    captions: Annotated[Path | None, typer.Option(help='JSONL {"image": <path or stem>, "caption": ...}.')] = None,
    partial_captions: PartialCaptions = False,
    rank: Annotated[int, typer.Option(help="LoRA rank.")] = FinetuneConfig.rank,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate.")] = FinetuneConfig.lr,
    lr_schedule: Annotated[
        FinetuneSchedule, typer.Option(help="Learning rate after the warmup (constant: the paper's).")
    ] = FinetuneConfig.lr_schedule,
    lr_warmup_steps: Annotated[
        int, typer.Option(help="Steps of linear warmup from 0 to --lr.")
    ] = FinetuneConfig.lr_warmup_steps,
    max_grad_norm: Annotated[
        float, typer.Option(help="Clip the LoRA gradients to this norm (0: no clipping).")
    ] = FinetuneConfig.max_grad_norm,
    batch_size: Annotated[
        int, typer.Option(help="Images per step, per process (the global batch is this x processes x --grad-accum).")
    ] = FinetuneConfig.batch_size,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = FinetuneConfig.grad_accum,
    max_steps: Annotated[
        int | None,
        typer.Option(
            help="Length in optimizer steps (a resumed run counts on). Default: with no --epochs either, "
            "at least 1000 steps and one epoch; the images seen are printed."
        ),
    ] = FinetuneConfig.max_steps,
    epochs: Annotated[
        float | None, typer.Option(help="Length in passes over the real images (instead of --max-steps).")
    ] = FinetuneConfig.epochs,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Side the images are cropped to, a multiple of 8 (diffusers' --resolution; "
            "default: the bundle's, 512 for SD-1.5)."
        ),
    ] = FinetuneConfig.image_size,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Data-loading processes per training process, decoding ahead of the step (default: its "
            "share of the cores, max 8; 0: in the training process)."
        ),
    ] = FinetuneConfig.workers,
    dm_weight: Annotated[
        float, typer.Option(help="Lambda of the distribution-matching term.")
    ] = FinetuneConfig.dm_weight,
    snr_gamma: Annotated[float, typer.Option(help="Min-SNR gamma.")] = FinetuneConfig.snr_gamma,
    checkpoint_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = FinetuneConfig.checkpoint_every,
    merge_scale: Annotated[
        float, typer.Option(help="LoRA scale fused into the merged bundle.")
    ] = FinetuneConfig.merge_scale,
    precision: Annotated[
        Precision,
        typer.Option(help=f"Mixed precision of the frozen parts ({AUTO_RULE}); LoRA trains in fp32."),
    ] = FinetuneConfig.precision,
    gradient_checkpointing: Annotated[
        bool, typer.Option(help="Recompute the UNet's activations in backward: less memory, slower steps.")
    ] = FinetuneConfig.gradient_checkpointing,
    guidance_token: Annotated[
        GuidanceToken,
        typer.Option(help="The image-embedding guidance token: auto (when the bundle has an image encoder), on, off."),
    ] = FinetuneConfig.guidance_token,
    seed: Annotated[int, typer.Option(help="Seed of data order, augmentation and noise.")] = FinetuneConfig.seed,
    debug: Debug = False,
) -> None:
    """LoRA-finetune the UNet with min-SNR denoising + the distribution-matching term; resumes from OUT."""
    from realfake.training.finetune import run_finetune

    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = FinetuneConfig(
        bundle=bundle,
        real=real,
        out=out,
        classes=classes,
        captions=captions,
        partial_captions=partial_captions,
        rank=rank,
        lr=lr,
        lr_schedule=lr_schedule,
        lr_warmup_steps=lr_warmup_steps,
        max_grad_norm=max_grad_norm,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_steps=max_steps,
        epochs=epochs,
        image_size=image_size,
        workers=workers,
        dm_weight=dm_weight,
        snr_gamma=snr_gamma,
        checkpoint_every=checkpoint_every,
        merge_scale=merge_scale,
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        guidance_token=guidance_token,
        seed=seed,
    )
    run_finetune(cfg, log=lambda m: typer.echo(m, err=True))


@app.command()
def classify(
    classes: Annotated[str, typer.Option(help="Class set that defines the labels (ids/names resolve against it).")],
    val: Annotated[
        list[str],
        typer.Option(
            help="Real validation set, [NAME=]DIR; repeat for more (out-of-distribution sets too; the first picks "
            "best.pt). DIR: class folders (id or name), or a flat folder labelled by --val-labels."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Run directory: last.pt, best.pt, metrics.jsonl, result.json.")],
    synthetic: Annotated[Path | None, typer.Option(help="rf-client output dir, or a dir of WebDataset shards.")] = None,
    real: Annotated[Path | None, typer.Option(help="Real training ImageFolder to mix in (or train on alone).")] = None,
    real_fraction: Annotated[
        float, typer.Option(help="Fraction of --real used (stratified per class).")
    ] = ClassifyConfig.real_fraction,
    versions: Annotated[
        int | None,
        typer.Option(
            help="Train on the first K versions of each real image of --synthetic (the same job at 1x, 2x, ...; "
            "same epochs, so K x the steps). Default: all."
        ),
    ] = None,
    recipe: Annotated[
        ClassifyRecipe | None,
        typer.Option(
            help="Settings of a known recipe, under the options given: realfake-reference (the paper's code: timm "
            "train.py, 200 epochs, 128 a process, multistep x0.2, 5 warmup epochs, label smoothing 0.1, colour "
            "jitter 0.4, eval crop 0.95 bicubic) or torchvision-resnet50 (90 epochs, 32 a process on 8, x0.1 every "
            "30, weight decay 1e-4). Without one, each option's default below."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help=f"A timm model name (e.g. resnet50, resnet18, convnext_tiny) or resnet-small (28-32 px). {_d('model')}"
        ),
    ] = None,
    image_size: Annotated[int | None, typer.Option(help="Input side (default 224, or 32 for resnet-small).")] = None,
    epochs: Annotated[int | None, typer.Option(help=f"Epochs. {_d('epochs')}")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help=f"Images per step per process (torchrun's and timm's count). {_d('batch_size')}")
    ] = None,
    lr: Annotated[float | None, typer.Option(help=f"SGD learning rate (not rescaled by the batch). {_d('lr')}")] = None,
    momentum: Annotated[float | None, typer.Option(help=f"SGD momentum. {_d('momentum')}")] = None,
    weight_decay: Annotated[float | None, typer.Option(help=f"Weight decay. {_d('weight_decay')}")] = None,
    lr_schedule: Annotated[
        ClassifyLrSchedule | None,
        typer.Option(help=f"multistep (x --gamma at --milestones) or cosine (to 0 at the end). {_d('lr_schedule')}"),
    ] = None,
    milestones: Annotated[
        str | None, typer.Option(help=f"Multistep decay points as fractions of the epochs. {_d('milestones')}")
    ] = None,
    gamma: Annotated[float | None, typer.Option(help=f"LR multiplier at each milestone. {_d('gamma')}")] = None,
    lr_warmup_epochs: Annotated[
        int | None,
        typer.Option(help=f"Epochs of linear warmup from --warmup-lr, inside the schedule. {_d('lr_warmup_epochs')}"),
    ] = None,
    warmup_lr: Annotated[float | None, typer.Option(help=f"The warmup's first rate. {_d('warmup_lr')}")] = None,
    label_smoothing: Annotated[float | None, typer.Option(help=f"Label smoothing. {_d('label_smoothing')}")] = None,
    mixup: Annotated[float | None, typer.Option(help=f"Mixup alpha (0: off). {_d('mixup')}")] = None,
    cutmix: Annotated[
        float | None, typer.Option(help=f"CutMix alpha (0: off; with --mixup, one of the two a batch). {_d('cutmix')}")
    ] = None,
    color_jitter: Annotated[
        float | None, typer.Option(help=f"Colour jitter of the training crop (0: off). {_d('color_jitter')}")
    ] = None,
    interpolation: Annotated[
        Interpolation | None,
        typer.Option(help=f"Resampling of the training crop (random: either, per image). {_d('interpolation')}"),
    ] = None,
    eval_interpolation: Annotated[
        EvalInterpolation | None, typer.Option(help=f"Resampling of validation images. {_d('eval_interpolation')}")
    ] = None,
    eval_crop: Annotated[
        float | None,
        typer.Option(help=f"Validation: resize to side / this, centre crop the side. {_d('eval_crop')}"),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(help="Data-loading processes per training process (default: its share of the cores, max 8)."),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="Seed of data order, augmentation, subsets and init.")
    ] = ClassifyConfig.seed,
    precision: Annotated[
        Precision, typer.Option(help=f"Mixed precision of the forward pass ({AUTO_RULE}).")
    ] = ClassifyConfig.precision,
    eval_every: Annotated[
        int, typer.Option(help="Epochs between validations (the last is always validated).")
    ] = ClassifyConfig.eval_every,
    val_labels: Annotated[
        list[str] | None,
        typer.Option(
            help="[NAME=]FILE labelling a flat --val folder: '<image> <wnid>' lines (LOC_val_solution.csv too), or "
            "the devkit's ILSVRC2012_validation_ground_truth.txt with --devkit-classes."
        ),
    ] = None,
    devkit_classes: Annotated[
        Path | None,
        typer.Option(help="The devkit's class order (from meta.mat): one wnid a line, line n = ILSVRC2012_ID n."),
    ] = None,
    fresh: Annotated[
        bool,
        typer.Option(
            "--fresh",
            help="Delete the run in OUT and start over (without it, re-running continues after the last finished "
            "epoch).",
        ),
    ] = False,
    debug: Debug = False,
) -> None:
    """Train a classifier from scratch on synthetic (and/or real) images; top-1/top-5 and per-class top-1 on
    each real validation set. Re-running the same command resumes; other settings on the same OUT are refused.

    Runs as one process, or as DDP under `torchrun --nproc-per-node N -m realfake.training.cli classify ...`.
    """
    from realfake.training.classify import run_classify

    cfg = ClassifyConfig(
        classes=classes,
        val=val,
        out=out,
        synthetic=synthetic,
        real=real,
        real_fraction=real_fraction,
        versions=versions,
        recipe=recipe,
        model=model,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        lr_schedule=lr_schedule,
        milestones=milestones,
        gamma=gamma,
        lr_warmup_epochs=lr_warmup_epochs,
        warmup_lr=warmup_lr,
        label_smoothing=label_smoothing,
        mixup=mixup,
        cutmix=cutmix,
        color_jitter=color_jitter,
        interpolation=interpolation,
        eval_interpolation=eval_interpolation,
        eval_crop=eval_crop,
        workers=workers,
        seed=seed,
        precision=precision,
        eval_every=eval_every,
        val_labels=val_labels or (),
        devkit_classes=devkit_classes,
        resume=not fresh,
    )
    run_classify(cfg, log=lambda m: typer.echo(m, err=True))


@app.command()
def corrupt(
    real: Annotated[Path, typer.Option(help="Real test ImageFolder to corrupt (one folder per class).")],
    out: Annotated[Path, typer.Option(help="OUT/<corruption>/<severity>/<class>/<image>, and corrupt.json.")],
    corruptions: Annotated[
        str,
        typer.Option(
            help="common (ImageNet-C's 15), validation (its 4 held-out), all, or comma-separated names "
            "(gaussian_noise, shot_noise, impulse_noise, defocus_blur, glass_blur, motion_blur, zoom_blur, snow, "
            "frost, fog, brightness, contrast, elastic_transform, pixelate, jpeg_compression, ...)."
        ),
    ] = "common",
    severities: Annotated[str, typer.Option(help="Comma-separated severities, 1 (mild) to 5.")] = "1,2,3,4,5",
    image_size: Annotated[
        int | None,
        typer.Option(help="Short side to this / 0.875, centre crop this first (ImageNet-C: 224); default: as is."),
    ] = None,
    image_format: Annotated[
        ImageFormat, typer.Option("--format", help="File format (ImageNet-C ships JPEG; png keeps every pixel).")
    ] = "jpeg",
    per_class: Annotated[int | None, typer.Option(help="Only the first N images of each class.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the corruptions' randomness (per image, reproducible).")] = 0,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: this process's share of the cores, max 8).")
    ] = None,
    debug: Debug = False,
) -> None:
    """Write a corrupted copy of a real test set with the ImageNet-C corruptions (the imagecorruptions package),
    one ImageFolder per corruption and severity, to score with `rf-train classify --val NAME=OUT/<c>/<s>`.
    Re-running keeps what is already written."""
    from realfake.training.corrupt import CorruptConfig, run_corrupt

    cfg = CorruptConfig(
        real=real,
        out=out,
        corruptions=corruptions,
        severities=int_list(severities, "--severities"),
        image_size=image_size,
        image_format=image_format,
        seed=seed,
        workers=workers,
        limit_per_class=per_class,
    )
    run_corrupt(cfg, log=lambda m: typer.echo(m, err=True))


@app.command()
def membership(
    classifier: Annotated[Path, typer.Option(help="An rf-train classify checkpoint (best.pt).")],
    members: Annotated[Path, typer.Option(help="ImageFolder of the real images in question (the training set).")],
    non_members: Annotated[Path, typer.Option(help="ImageFolder of held-out real images of the same classes.")],
    classes: Annotated[str, typer.Option(help="The class set the classifier was trained on.")],
    out: Annotated[Path | None, typer.Option(help="Folder for membership.json.")] = None,
    per_class: Annotated[int | None, typer.Option(help="At most N images of each class on each side.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the subsampling.")] = 0,
    debug: Debug = False,
) -> None:
    """Membership inference (loss-threshold attack) against a classifier: its AUC and TPR at 1 % FPR at telling
    the real images it was trained on (or whose synthetic versions it was trained on) from held-out ones."""
    from realfake.training.membership import MembershipConfig, run_membership

    cfg = MembershipConfig(
        classifier=classifier,
        members=members,
        non_members=non_members,
        classes=classes,
        out=out,
        per_class=per_class,
        seed=seed,
    )
    result = run_membership(cfg, log=lambda m: typer.echo(m, err=True))
    typer.echo(f"auc {result['auc']:.4f} tpr_at_1pct_fpr {result['tpr_at_1pct_fpr']:.4f}")


@app.command("add-image-encoder")
def add_image_encoder(
    bundle: Annotated[Path, typer.Option(help="Base diffusers-layout bundle without image_encoder/ (e.g. SD-1.5).")],
    image_encoder: Annotated[
        Path,
        typer.Option(
            help="Local CLIP checkpoint: a CLIPVisionModelWithProjection, or a whole CLIPModel (e.g. a copy of "
            "openai/clip-vit-large-patch14) whose vision tower and projection are taken."
        ),
    ],
    out: Annotated[
        Path, typer.Option(help="The bundle with image_encoder/ (files hard-linked from --bundle; may be --bundle).")
    ],
    debug: Debug = False,
) -> None:
    """Add the CLIP image encoder the guidance token needs to a bundle (a stock SD-1.5 has none). The projection
    width must be the text encoder's (768 for SD-1.5 with ViT-L/14); every weight of the tower must be found."""
    from realfake.training.image_encoder import add_image_encoder as run

    warnings.filterwarnings("ignore")
    run(bundle, image_encoder, out, log=lambda m: typer.echo(m, err=True))


@app.command()
def caption(
    real: Annotated[Path, typer.Option(help="Real ImageFolder: one folder per class.")],
    model: Annotated[Path, typer.Option(help="Local image-to-text model directory (BLIP-2, BLIP, ...).")],
    out: Annotated[Path, typer.Option(help='Captions JSONL {"image": <relative path>, "caption": ...}.')],
    classes: Annotated[
        str | None, typer.Option(help="Class set the folders must match (default: any folder is a class).")
    ] = None,
    prompt: Annotated[str, typer.Option(help='Text the caption continues, e.g. "a photo of".')] = CaptionConfig.prompt,
    max_new_tokens: Annotated[int, typer.Option(help="Longest caption, in tokens.")] = CaptionConfig.max_new_tokens,
    num_beams: Annotated[int, typer.Option(help="Beam search width (1: greedy).")] = CaptionConfig.num_beams,
    batch_size: Annotated[int, typer.Option(help="Images per generate call.")] = CaptionConfig.batch_size,
    precision: Annotated[
        Precision, typer.Option(help=f"The captioner's precision ({AUTO_RULE}).")
    ] = CaptionConfig.precision,
    shard: Annotated[
        str | None,
        typer.Option(
            help="I/N: caption every N-th image from the I-th (a cluster array task). Under torchrun or accelerate "
            "launch the rank and world size split the work instead, one GPU each. The last to finish merges."
        ),
    ] = None,
    debug: Debug = False,
) -> None:
    """Caption every real image for the Real-Fake prompts; re-running continues where the file stops. Split over
    processes (--shard I/N, or torchrun's ranks), each process writes its own part file and the last one to
    finish merges them into --out, every image once."""
    from realfake.training.caption import run_caption

    warnings.filterwarnings("ignore")
    cfg = CaptionConfig(
        real=real,
        model=model,
        out=out,
        classes=classes,
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        batch_size=batch_size,
        precision=precision,
        shard=shard,
    )
    run_caption(cfg, log=lambda m: typer.echo(m, err=True))


@app.command("evaluate-data")
def evaluate_data(
    real: Annotated[Path, typer.Option(help="Real ImageFolder (folders: class id or name).")],
    synthetic: Annotated[Path, typer.Option(help="rf-client output (read by its manifest), or an ImageFolder.")],
    classes: Annotated[
        str,
        typer.Option(help="Class set: imagenet, cifar10, cifar100, fashion-mnist, a class file, or an ImageFolder."),
    ],
    out: Annotated[Path, typer.Option(help="Report directory: evaluate.json/.md, per_class.png, near_copies.png.")],
    bundle: Annotated[Path | None, typer.Option(help="Features: this bundle's CLIP image encoder.")] = None,
    classifier: Annotated[Path | None, typer.Option(help="Features: an rf-train classify best.pt.")] = None,
    torchvision: Annotated[str | None, typer.Option(help="Features: a torchvision model (with --weights).")] = None,
    weights: Annotated[Path | None, typer.Option(help="Local state-dict file of the --torchvision model.")] = None,
    per_class: Annotated[int | None, typer.Option(help="At most this many images per class of each set.")] = None,
    nearest_k: Annotated[
        int, typer.Option(help="k of precision/recall/density/coverage.")
    ] = EvaluateDataConfig.nearest_k,
    copy_threshold: Annotated[
        float, typer.Option(help="Cosine distance to a real image under which a synthetic image is a near-copy.")
    ] = EvaluateDataConfig.copy_threshold,
    worst_pairs: Annotated[
        int, typer.Option(help="Closest synthetic-real pairs drawn in near_copies.png.")
    ] = EvaluateDataConfig.worst_pairs,
    prdc_max: Annotated[
        int, typer.Option(help="Overall precision/recall on at most this many images per set.")
    ] = EvaluateDataConfig.prdc_max,
    kid_subsets: Annotated[
        int, typer.Option(help="KID subsets (of min(1000, set size) images) per class and overall.")
    ] = EvaluateDataConfig.kid_subsets,
    batch_size: Annotated[int, typer.Option(help="Images per encoder call.")] = EvaluateDataConfig.batch_size,
    seed: Annotated[int, typer.Option(help="Seed of the KID subsets and PRDC subsampling.")] = EvaluateDataConfig.seed,
    debug: Debug = False,
) -> None:
    """FID, KID, precision/recall, density/coverage and near-copies of a synthetic set against the real one,
    per class and overall, on features of a local encoder."""
    warnings.filterwarnings("ignore")
    cfg = EvaluateDataConfig(
        real=real,
        synthetic=synthetic,
        out=out,
        classes=classes,
        bundle=bundle,
        classifier=classifier,
        torchvision=torchvision,
        weights=weights,
        per_class=per_class,
        nearest_k=nearest_k,
        copy_threshold=copy_threshold,
        worst_pairs=worst_pairs,
        prdc_max=prdc_max,
        kid_subsets=kid_subsets,
        batch_size=batch_size,
        seed=seed,
    )
    cfg.validate()  # before the model libraries load: a wrong command line answers at once
    from realfake.training.evaluate_data import run_evaluate_data

    run_evaluate_data(cfg, log=lambda m: typer.echo(m, err=True))


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option(help="Run directory (stages/, datasets, results.json/.md, grid PNG).")
    ] = DemoConfig.out,
    fmnist: Annotated[
        Path, typer.Option(help="Directory with the four Fashion-MNIST idx .gz files.")
    ] = DemoConfig.fmnist,
    per_class: Annotated[int, typer.Option(help="Real training images per class.")] = DemoConfig.per_class,
    test_images: Annotated[
        int, typer.Option(help="Real test images to evaluate on (max 10000).")
    ] = DemoConfig.test_images,
    base_vae_steps: Annotated[
        int, typer.Option(help="Training steps of the base model's VAE.")
    ] = DemoConfig.base_vae_steps,
    base_unet_steps: Annotated[
        int, typer.Option(help="Training steps of the base model's UNet.")
    ] = DemoConfig.base_unet_steps,
    finetune_steps: Annotated[int, typer.Option(help="Real-Fake finetuning steps.")] = DemoConfig.finetune_steps,
    steps: Annotated[int, typer.Option(help="Sampler steps at generation.")] = DemoConfig.steps,
    guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = DemoConfig.guidance_scale,
    strength: Annotated[
        float, typer.Option(help="Latent prior strength (the paper's 0.75 needs a stronger base model).")
    ] = DemoConfig.strength,
    epochs: Annotated[int, typer.Option(help="Classifier epochs.")] = DemoConfig.epochs,
    ablate: Annotated[
        bool, typer.Option("--ablate", help="Add ablation rows (text-only base, + finetune, + prior).")
    ] = False,
    runtime: Annotated[
        DemoRuntime,
        typer.Option(
            help="How Triton runs the models (as `rf-export repo --runtime`): python-ort (ONNX Runtime, fp32, "
            "exact) or openvino (with --precision)."
        ),
    ] = DemoConfig.runtime,
    precision: Annotated[
        CpuPrecision,
        typer.Option(
            help="auto: fp32 (the CPU). openvino: fp32, bf16, or int8 (the UNet quantized on the class prompts "
            "first; fastest on CPU). python-ort: fp32."
        ),
    ] = DemoConfig.precision,
    http_port: Annotated[int | None, typer.Option(help="Port of the local Triton (default: a free one).")] = None,
    real: Annotated[
        Path | None,
        typer.Option(
            help="Your own real images instead of Fashion-MNIST: an ImageFolder (a folder per class; the folder names "
            "are the classes). --per-class of each class are trained on; test images are held out from it."
        ),
    ] = None,
    real_test: Annotated[
        Path | None, typer.Option(help="Held-out real test images (an ImageFolder of the same classes), with --real.")
    ] = None,
    bundle: Annotated[
        Path | None,
        typer.Option(help="A base diffusers bundle to finetune (e.g. SD-1.5): no base model is trained here."),
    ] = None,
    captioner: Annotated[
        Path | None,
        typer.Option(
            help="A local image-to-text model (e.g. BLIP-2): the real images are captioned (rf-train caption) and "
            "the captions go into the finetune and the generation prompts."
        ),
    ] = None,
    ood_per_class: Annotated[
        int,
        typer.Option(
            help="Test images per class copied with each of ImageNet-C's 15 corruptions (rf-train corrupt) and scored "
            "by every classifier beside the clean set; 0: none."
        ),
    ] = DemoConfig.ood_per_class,
    ood_severity: Annotated[int, typer.Option(help="Severity of those corruptions (1-5).")] = DemoConfig.ood_severity,
    scaling: Annotated[
        str | None,
        typer.Option(
            help="Versions of each real image to scale the synthetic set to, e.g. 1,2,4: the set is made at the "
            "largest, and synthetic-only and real + synthetic classifiers train on the first k (same epochs). "
            "Off by default (each k adds two classifiers and the generation of the extra versions)."
        ),
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Forget finished stages of OUT and start over.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of everything.")] = DemoConfig.seed,
    debug: Debug = False,
) -> None:
    """The whole Real-Fake loop on CPU: base model, (captions,) finetune, export, Triton, generate, the synthetic
    set against the real one (FID, KID, precision/recall, near-copies), classifiers on real / synthetic / both, and
    the table. On Fashion-MNIST by default; on your own data with --real DIR [--bundle BASE] [--captioner DIR].
    Re-running resumes."""
    import shutil

    from realfake.client.default_model import home
    from realfake.training.demo import Demo

    warnings.filterwarnings("ignore")
    if precision not in RUNTIMES[runtime]:
        raise UserError(f"--runtime {runtime} takes --precision {', '.join(RUNTIMES[runtime])}, not {precision!r}")
    if real_test and not real:
        raise UserError("--real-test needs --real (the Fashion-MNIST demo has its own test split)")
    if fresh and out.exists():
        shutil.rmtree(out)
    cfg = DemoConfig(
        out=out,
        fmnist=fmnist,
        per_class=per_class,
        test_images=test_images,
        base_vae_steps=base_vae_steps,
        base_unet_steps=base_unet_steps,
        finetune_steps=finetune_steps,
        steps=steps,
        guidance_scale=guidance_scale,
        strength=strength,
        epochs=epochs,
        model="resnet-small",
        ablate=ablate,
        seed=seed,
        runtime=runtime,
        precision=precision,
        http_port=http_port,
        real=real,
        real_test=real_test,
        bundle=bundle,
        ood_per_class=ood_per_class,
        ood_severity=ood_severity,
        scaling=tuple(int_list(scaling, "--scaling")) if scaling else (),
        captioner=captioner,
    )
    Demo(cfg, home() / "demo", log=lambda m: typer.echo(m, err=True)).run()


demo_app = make_app("The whole Real-Fake loop on CPU.", no_args_is_help=False)
demo_app.command()(demo)


def demo_main() -> None:
    run_cli(demo_app, "rf-demo", has_commands=False)


def main() -> None:
    run_cli(app, "rf-train")


if __name__ == "__main__":
    main()
