"""`rf-train classify`: train a classifier from scratch on synthetic data (optionally mixed with real) and
evaluate top-1/top-5 and per-class top-1 on one or more real validation sets. Single process, or DDP under
`torchrun` (gloo on CPU, nccl on GPU). Re-running the same command resumes the run in its directory.

Models, transforms, schedules and mixup are timm's (any timm model name; `resnet-small` is ours, for 28-32 px);
named recipes (classify_config.RECIPES) reproduce known training recipes.

Labels come from class ids resolved against one class set, never from folder sort order: the synthetic set's
manifest rows carry class ids, real ImageFolders are matched by folder name (class id or name), flat folders
(the ILSVRC-2012 validation layout) by a labels file (see image_sets.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from realfake.core.classes import ClassInfo, load_classes
from realfake.core.errors import UserError
from realfake.core.files import atomic_file, write_atomic
from realfake.core.precision import resolve_precision
from realfake.training.classify_config import (
    RECIPES,
    RESUME_KEYS,
    RUN_FILES,
    SMALL_MODEL,
    Augment,
    ClassifyConfig,
    check_model,
    default_workers,
)
from realfake.training.image_sets import (
    RefTable,
    ValSpec,
    folder_refs,
    read_devkit_classes,
    stratified_fraction,
    synthetic_refs,
    val_refs,
    val_specs,
)

# -- data -----------------------------------------------------------------------------------------------


class RefDataset(torch.utils.data.Dataset):
    """Images by index; an (index, seed) item is augmented with that seed (torch's and Python's generators: timm's
    crops draw from `random`), so a sample's augmentation does not depend on which worker loads it, how many there
    are, or whether the run was resumed."""

    def __init__(self, refs: RefTable, transform):
        self.refs, self.transform = refs, transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, item: int | tuple[int, int]):
        if isinstance(item, tuple):
            index, seed = item
            state = random.getstate()
            try:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(seed)
                    random.seed(seed)
                    return self._load(index)
            finally:
                random.setstate(state)
        return self._load(item)

    def _load(self, i: int):
        import io

        from PIL import Image

        ref = self.refs[i]
        if ref.offset >= 0:
            with open(ref.path, "rb") as f:
                f.seek(ref.offset)
                image = Image.open(io.BytesIO(f.read(ref.size)))
        else:
            image = Image.open(ref.path)
        with image:
            return self.transform(image.convert("RGB")), ref.label


class EpochBatches:
    """This rank's batches of one epoch (`set_epoch` picks it): its share of a permutation seeded by (seed,
    epoch), disjoint across ranks, no padding, every sample once, each with an augmentation seed of its own."""

    def __init__(self, n: int, batch: int, seed: int, rank: int, world: int):
        self.n, self.batch, self.seed, self.rank, self.world, self.epoch = n, batch, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)[self.rank :: self.world]

    def __iter__(self):
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(0, 2**62, size=self.n)
        for batch in _batches(self.indices(), self.batch):
            yield [(i, int(seeds[i])) for i in batch]

    def __len__(self) -> int:
        return len(_batches(self.indices(), self.batch))


def transforms(size: int, train: bool, small: bool, aug: Augment = Augment()):
    """PIL image -> normalised tensor. resnet-small: resize, pad-and-crop, flip. Every other model: timm's
    ImageNet transforms (training: random-resized crop of 8-100 % of the area, flip, colour jitter when asked;
    validation: resize to size / eval_crop and centre crop), with ImageNet's mean and std."""
    if small:
        from torchvision.transforms import v2

        norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
        flips = [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()] if train else []
        return v2.Compose([v2.Resize((size, size)), *flips, *norm])
    from timm.data import create_transform

    if train:
        return create_transform(
            size,
            is_training=True,
            scale=(0.08, 1.0),
            ratio=(3 / 4, 4 / 3),
            hflip=0.5,
            color_jitter=aug.color_jitter or None,
            interpolation=aug.interpolation,
        )
    return create_transform(size, is_training=False, crop_pct=aug.eval_crop, interpolation=aug.eval_interpolation)


@dataclass
class ValSet:
    """A validation set ready to evaluate: its images, and the outputs its top-1/top-5 are taken over (all of
    them, or only its own classes when it covers a subset of the training classes, as ImageNet-A/-R do)."""

    spec: ValSpec
    refs: RefTable
    scored_over: list[int] | None
    absent: int  # labelled images missing from the folder (a partial copy of a flat set)


def load_val_sets(cfg: ClassifyConfig, classes: list[ClassInfo], train_labels: set[int]) -> list[ValSet]:
    """The --val sets with their labels. The first must cover exactly the training classes (it picks best.pt);
    later ones may cover a subset; no set may hold a class the training set lacks."""
    devkit = read_devkit_classes(Path(cfg.devkit_classes), classes) if cfg.devkit_classes else None
    name = {c.index: c.id for c in classes}
    sets = []
    for n, spec in enumerate(val_specs(cfg.val, cfg.val_labels)):
        refs, absent = val_refs(spec, classes, devkit)
        labels = refs.label_set()
        only_val, only_train = labels - train_labels, (train_labels - labels if n == 0 else set())
        if only_val or only_train:
            where = "validation sets" if len(cfg.val) == 1 else f"validation sets ({spec.name})"
            raise UserError(
                f"class mismatch between training and {where}: only in training: "
                f"{', '.join(name[i] for i in sorted(only_train)[:5]) or 'none'}; only in validation: "
                f"{', '.join(name[i] for i in sorted(only_val)[:5]) or 'none'}"
            )
        sets.append(ValSet(spec, refs, sorted(labels) if labels != train_labels else None, absent))
    return sets


# -- models ---------------------------------------------------------------------------------------------


def build_model(name: str, num_classes: int) -> torch.nn.Module:
    """A timm model by name with random weights (never fetched), or ours for 28-32 px inputs."""
    check_model(name)
    if name != SMALL_MODEL:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=num_classes)
    from torchvision.models.resnet import BasicBlock

    # resnet-small: 3x3 stem, no max-pool, three stages of basic blocks

    def stage(cin, cout, stride):
        down = None
        if stride != 1 or cin != cout:
            down = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout))
        return BasicBlock(cin, cout, stride, downsample=down)

    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, 1, 1, bias=False),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(inplace=True),
        stage(32, 32, 1),
        stage(32, 64, 2),
        stage(64, 128, 2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(128, num_classes),
    )


@dataclass
class Checkpoint:
    """A trained classifier read back from an rf-train classify checkpoint: the model (weights loaded), its run's
    settings, and the validation transform it was scored with."""

    model: torch.nn.Module
    config: dict
    image_size: int
    transform: Callable


def load_checkpoint(path: Path, num_classes: int | None = None, what: str = "--classifier") -> Checkpoint:
    """Rebuild the model of `best.pt`/`last.pt` (as `run_classify` writes them) and load its weights; with
    `num_classes`, a checkpoint of another class count is refused (the caller's class set does not fit it)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    try:
        # last.pt holds the RNG states (numpy's among them), which weights_only refuses: as resume reads it, this
        # reads a checkpoint rf-train classify wrote (a pickle: give only files you trust)
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure: not a checkpoint we can read
        raise UserError(f"{what} {path} is not a torch checkpoint ({type(exc).__name__})") from None
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict) and isinstance(ckpt.get("config"), dict)):
        raise UserError(f"{what} {path} is not an rf-train classify checkpoint (best.pt or last.pt)")
    config, state = ckpt["config"], ckpt["model"]
    head = next((v.shape[0] for v in reversed(list(state.values())) if getattr(v, "ndim", 0) == 2), None)
    if head is None:
        raise UserError(f"{what} {path} holds no classifier head")
    if num_classes is not None and head != num_classes:
        raise UserError(f"{what} {path} classifies {head} classes, not the {num_classes} of the class set given")
    model = build_model(config["model"], head)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{what} {path} does not fit model {config['model']}: {first}") from None
    small = config["model"] == SMALL_MODEL
    size = config.get("image_size") or (32 if small else 224)
    return Checkpoint(model, config, size, transforms(size, False, small, Augment.of(config)))


# -- the schedule and the loss ----------------------------------------------------------------------------------


def make_scheduler(cfg: ClassifyConfig, optimizer: torch.optim.Optimizer):
    """timm's per-epoch schedule of `cfg`: `lr_warmup_epochs` of linear warmup from `warmup_lr` (counted inside the
    schedule, as timm's train.py does), then multistep (x gamma once each milestone's epochs have finished) or
    cosine to 0 at the last epoch. `step(e)` sets the rate of epoch e (0-based)."""
    from timm.scheduler import create_scheduler_v2

    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.lr_schedule,
        num_epochs=cfg.epochs,
        decay_milestones=[m + 1 for m in cfg.milestone_epochs()],  # timm applies milestone m from epoch index m - 1
        decay_rate=cfg.gamma,
        warmup_epochs=cfg.lr_warmup_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=0.0,
        step_on_epochs=True,
    )
    return scheduler


def make_mixup(cfg: ClassifyConfig, n_classes: int):
    """timm's Mixup/CutMix with the label smoothing folded into its soft targets, or None when neither is on."""
    if not (cfg.mixup or cfg.cutmix):
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=n_classes
    )


def _mix(mixup, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed images and soft targets. timm mixes pairs, so an odd batch mixes all but its last image, which keeps
    its own (smoothed) target."""
    from timm.data.mixup import mixup_target

    n = len(labels) - len(labels) % 2
    if n == 0:
        return images, mixup_target(labels, mixup.num_classes, 1.0, mixup.label_smoothing)
    mixed, targets = mixup(images[:n], labels[:n])
    if n == len(labels):
        return mixed, targets
    rest = mixup_target(labels[n:], mixup.num_classes, 1.0, mixup.label_smoothing)
    return torch.cat([mixed, images[n:]]), torch.cat([targets, rest])


def _loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Cross-entropy on class ids (label-smoothed when asked), or on mixup's soft targets."""
    if targets.ndim == 2:
        return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return torch.nn.functional.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def recipe_line(cfg: ClassifyConfig, world: int) -> str:
    """What --recipe took, from where, and how this run's global batch compares with its source's."""
    recipe = RECIPES[cfg.recipe]
    source_batch = recipe.processes * recipe.settings["batch_size"]
    line = f"recipe {recipe.name}: {recipe.source}"
    here = world * cfg.batch_size
    if here != source_batch:
        line += (
            f"; its global batch was {source_batch} ({recipe.processes} x {recipe.settings['batch_size']}), this"
            f" run's is {here}: --lr is not rescaled"
        )
    return line


# -- distributed ----------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return dist, world, rank


def _all_sum(t: torch.Tensor, world: int, device: torch.device) -> torch.Tensor:
    """Sum of a tensor over ranks (on the device: nccl reduces CUDA tensors only), back on the CPU."""
    if world == 1:
        return t.cpu()
    import torch.distributed as dist

    t = t.to(device)
    dist.all_reduce(t)
    return t.cpu()


def _gather_indices(indices: np.ndarray, world: int, dist) -> int:
    """Unique sample count over all ranks this epoch (equals the dataset size when nothing is duplicated)."""
    if world == 1:
        return len(np.unique(indices))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, indices.tolist())
    return len({i for part in gathered for i in part})


def _batches(indices: np.ndarray, size: int) -> list[list[int]]:
    """Batches of `size`; a last batch of one image joins the previous one (BatchNorm cannot train on 1)."""
    batches = [indices[i : i + size].tolist() for i in range(0, len(indices), size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        last = batches.pop()  # not `batches[-2] += batches.pop()`: its target index is taken after the pop
        batches[-1] += last
    return batches


# -- evaluation -----------------------------------------------------------------------------------------


@torch.no_grad()
def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `--precision` on `device` (None: fp32, no autocast), by the one `auto` rule."""
    gpu = device.type == "cuda"
    resolved = resolve_precision(
        precision, gpu=gpu, bf16=gpu and torch.cuda.is_bf16_supported(), choices=("auto", "fp32", "fp16", "bf16")
    )
    if resolved == "fp16" and not gpu:
        raise UserError("--precision fp16 needs a GPU (its loss scaling is CUDA's); on the CPU use bf16 or fp32")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(resolved)


def evaluate(
    model: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    n_classes: int,
    device: torch.device,
    batch: int,
    workers: int = 0,
    rank: int = 0,
    world: int = 1,
    scored_over: list[int] | None = None,
    amp_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Per class: top-1 hits, top-5 hits and images (a 3 x n_classes tensor) over the whole set, each rank taking
    every world-th image. Outputs outside `scored_over` (when given) are never predictions."""
    model.eval()
    subset = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    loader = torch.utils.data.DataLoader(
        subset, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda"
    )
    counts = torch.zeros(3, n_classes, dtype=torch.float64)
    offset = torch.zeros(n_classes, device=device)
    if scored_over is not None:
        offset.fill_(float("-inf"))
        offset[scored_over] = 0.0
    k = min(5, n_classes if scored_over is None else len(scored_over))
    for images, labels in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(images.to(device, non_blocking=True))
        top = (logits.float() + offset).topk(k, dim=1).indices.cpu()
        hits = torch.stack([top[:, 0] == labels, (top == labels[:, None]).any(dim=1), torch.ones_like(labels) > 0])
        counts.index_add_(1, labels, hits.double())
    return _all_sum(counts, world, device)


def summarize(counts: torch.Tensor, classes: list[ClassInfo]) -> dict:
    """Top-1 and top-5 over the set, and the top-1 of every class it holds (from `evaluate`'s counts)."""
    hits1, hits5, images = counts.tolist()
    n = sum(images)
    return {
        "images": int(n),
        "top1": sum(hits1) / max(n, 1),
        "top5": sum(hits5) / max(n, 1),
        "per_class": {
            c.id: {"images": int(images[c.index]), "top1": hits1[c.index] / images[c.index]}
            for c in classes
            if images[c.index] > 0
        },
    }


# -- the run --------------------------------------------------------------------------------------------


def run_classify(cfg: ClassifyConfig, log=print, on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train and validate as `cfg` says; returns the result, also written to OUT/result.json. A run directory
    holding an unfinished run of the same settings is continued after its last finished epoch (`cfg.resume`);
    a finished one is only reported. `on_epoch(row)` is called after each epoch's checkpoint."""
    from torch.nn.parallel import DistributedDataParallel
    from tqdm.auto import tqdm

    # 1. the data: training images, validation sets, and their classes
    cfg.validate()
    classes = load_classes(cfg.classes)
    syn = synthetic_refs(Path(cfg.synthetic), classes, cfg.versions) if cfg.synthetic else RefTable.empty()
    real_all = folder_refs(Path(cfg.real), classes) if cfg.real else RefTable.empty()
    real = stratified_fraction(real_all, cfg.real_fraction, cfg.seed) if len(real_all) else RefTable.empty()
    train_refs = syn + real
    if not len(train_refs):
        raise UserError("the training set is empty")
    val_sets = load_val_sets(cfg, classes, train_refs.label_set())

    # 2. processes, model, optimizer, loaders
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before the process group: nccl's collectives use the current device
    dist, world, rank = _dist()
    main = rank == 0
    say = log if main else (lambda *_: None)
    workers = default_workers() if cfg.workers is None else cfg.workers
    torch.manual_seed(cfg.seed)
    small = cfg.model == SMALL_MODEL
    train_set = RefDataset(train_refs, transforms(cfg.size, True, small, cfg.augment))
    val_transform = transforms(cfg.size, False, small, cfg.augment)
    model = build_model(cfg.model, len(classes)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model) if world > 1 else None
    net = ddp or model
    per_rank_batch = cfg.batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(cfg, optimizer)
    mixup = make_mixup(cfg, len(classes))
    amp_dtype = autocast_dtype(cfg.precision, device)
    use_amp = amp_dtype is not None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)  # bf16 needs no loss scaling
    sampler = EpochBatches(len(train_set), per_rank_batch, cfg.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )

    # 3. a new run, or the one in OUT continued where its last checkpoint left it
    out = Path(cfg.out)
    data = {"synthetic_images": len(syn), "real_images": len(real)}
    data |= {f"val {v.spec.name}": len(v.refs) for v in val_sets}
    state = _open_run(cfg, out, data, main, say, world, dist)
    if state is None:
        run = {"id": uuid.uuid4().hex[:12], "attempt": 0, "epoch": 0, "best_top1": None, "best_epoch": None}
        run |= {"history": [], "evals": {}, "wall_seconds": 0.0, "data": data}
    else:
        run = state["run"]
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
    finished = run["epoch"] >= cfg.epochs
    if not finished:
        run["attempt"] += 1
    if main:
        out.mkdir(parents=True, exist_ok=True)
        # the run's own epochs only: an epoch a crash logged after the last checkpoint is run (and logged) again
        write_atomic(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in run["history"]).encode())
    if finished:
        say(f"{out}: run {run['id']} finished all {cfg.epochs} epochs already (--fresh starts it over)")
    elif run["epoch"]:
        say(f"resuming run {run['id']} after epoch {run['epoch']}/{cfg.epochs} (attempt {run['attempt']})")
    say(
        f"training {cfg.model} on {len(syn)} synthetic + {len(real)} real images ({len(classes)} classes), "
        f"validating on {', '.join(f'{v.spec.name} ({len(v.refs)})' for v in val_sets)}; {world} process(es) x "
        f"{per_rank_batch} images = {world * per_rank_batch} per step, {workers} loader worker(s) each"
    )
    if cfg.recipe:
        say(recipe_line(cfg, world))
    for v in val_sets:
        if v.absent:
            say(f"warning: {v.absent} image(s) labelled in {v.spec.labels} are not in {v.spec.path}")

    # 4. epochs: train, validate (every eval_every-th and the last), log, checkpoint
    with open(out / "metrics.jsonl", "a") if main else contextlib.nullcontext() as metrics:
        for epoch in range(run["epoch"], cfg.epochs):
            t0 = time.perf_counter()
            sampler.set_epoch(epoch)
            seen = _gather_indices(sampler.indices(), world, dist)
            np.random.seed([cfg.seed, epoch, rank])  # mixup's draws (numpy's): the same on a resumed run
            lr = optimizer.param_groups[0]["lr"]
            net.train()
            # loss x images, correct, images: summed on the device, read once an epoch (no sync per step)
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            show = main and sys.stderr.isatty()
            bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not show, leave=False)
            with ddp.join() if ddp is not None else contextlib.nullcontext():
                for step, (images, labels) in enumerate(bar):
                    images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                    inputs, targets = _mix(mixup, images, labels) if mixup is not None else (images, labels)
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
                        logits = net(inputs)
                        loss = _loss(logits, targets, cfg.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    sums[0] += loss.detach().double() * len(labels)
                    sums[1] += (logits.argmax(1) == labels).sum()
                    sums[2] += len(labels)
                    if show and step % 20 == 0:
                        bar.set_postfix(loss=f"{loss.item():.3f}")
            scheduler.step(epoch + 1)
            loss_sum, correct, count = _all_sum(sums, world, device).tolist()
            row = {
                "run": run["id"],
                "attempt": run["attempt"],
                "epoch": epoch + 1,
                "train_loss": loss_sum / count,
                "train_top1": correct / count,
                "lr": lr,  # the rate this epoch trained at
                "samples_seen": int(count),
                "unique_samples": seen,
                "images_per_sec": round(count / (time.perf_counter() - t0), 2),
            }
            if (epoch + 1) % max(cfg.eval_every, 1) == 0 or epoch + 1 == cfg.epochs:
                for v in val_sets:
                    counts = evaluate(
                        model,
                        RefDataset(v.refs, val_transform),
                        len(classes),
                        device,
                        per_rank_batch,
                        workers,
                        rank,
                        world,
                        v.scored_over,
                        amp_dtype,
                    )
                    run["evals"][v.spec.name] = summarize(counts, classes)
                row["val"] = {name: {"top1": e["top1"], "top5": e["top5"]} for name, e in run["evals"].items()}
            say(_epoch_line(row, cfg.epochs))
            run["history"].append(row)
            run["epoch"] = epoch + 1
            run["wall_seconds"] += time.perf_counter() - t0
            if main:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                top1 = run["evals"][val_sets[0].spec.name]["top1"] if "val" in row else None
                if top1 is not None and (run["best_top1"] is None or top1 > run["best_top1"]):
                    run["best_top1"], run["best_epoch"] = top1, epoch + 1
                    best = {"model": model.state_dict(), "epoch": epoch + 1, "val_top1": top1}
                    _save(out / "best.pt", best | {"config": cfg.record()})
                _save(
                    out / "last.pt",
                    {
                        "run": run,
                        "config": cfg.record(),
                        "model": model.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": _rng_state(device),
                    },
                )
            if on_epoch is not None:
                on_epoch(row)

    # 5. the result: the last epoch's validation of every set, per class too
    result = {}
    if main:
        train = {
            "synthetic": str(cfg.synthetic) if cfg.synthetic else None,
            "synthetic_images": len(syn),
            "synthetic_versions": cfg.versions,
            "real": str(cfg.real) if cfg.real else None,
            "real_available": len(real_all),
            "real_fraction": cfg.real_fraction if cfg.real else None,
            "real_images": len(real),
            "total_images": len(train_refs),
        }
        result = _result(cfg, run, val_sets, train, classes, world, workers)
        write_atomic(out / "result.json", json.dumps(result, indent=1).encode())
        scores = "; ".join(f"{n}: top-1 {v['top1']:.4f}, top-5 {v['top5']:.4f}" for n, v in result["val"].items())
        say(f"{scores} (best top-1 {run['best_top1']:.4f}, epoch {run['best_epoch']}) -> {out / 'result.json'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _epoch_line(row: dict, epochs: int) -> str:
    line = f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.3f}, train top-1 {row['train_top1']:.4f}"
    for name, v in row.get("val", {}).items():  # epochs that are not validated say nothing of validation
        line += f"; val {name}: top-1 {v['top1']:.4f}, top-5 {v['top5']:.4f}"
    return line


def _result(cfg, run, val_sets, train, classes, world, workers) -> dict:
    first = run["evals"][val_sets[0].spec.name]
    return {
        "run": run["id"],
        "attempts": run["attempt"],
        "model": cfg.model,
        "recipe": cfg.recipe,
        "image_size": cfg.size,
        "global_batch": world * cfg.batch_size,
        "epochs": cfg.epochs,
        "processes": world,
        "workers": workers,
        "top1": first["top1"],  # of the first validation set, which also picks best.pt
        "top5": first["top5"],
        "best_top1": run["best_top1"],
        "best_epoch": run["best_epoch"],
        "train": train,
        "val": {
            v.spec.name: {
                "path": str(v.spec.path),
                "layout": v.spec.layout,
                "labels": str(v.spec.labels) if v.spec.labels else None,
                "scored_over_classes": len(v.scored_over) if v.scored_over else len(classes),
                **run["evals"][v.spec.name],
            }
            for v in val_sets
        },
        "classes": len(classes),
        "wall_seconds": round(run["wall_seconds"], 2),
        "config": cfg.record(),
    }


def _open_run(cfg: ClassifyConfig, out: Path, data: dict, main: bool, say, world: int, dist) -> dict | None:
    """The checkpoint of the run in `out` to continue, or None to start one (after `--fresh` cleared `out`).
    Refused: a run directory without last.pt, and a run of other settings or other data."""
    found = [f for f in RUN_FILES if (out / f).exists()]
    if main and found and not cfg.resume:
        say(f"--fresh: replacing the run in {out} (removed its {', '.join(found)})")
        for f in found:
            (out / f).unlink()
    if world > 1:
        dist.barrier()
    if not cfg.resume or not found:
        return None
    if "last.pt" not in found:
        raise UserError(
            f"{out} holds {', '.join(found)} but no last.pt, so its run cannot be resumed: pass --fresh to replace"
            " it, or choose another --out"
        )
    state = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    old, new = state["config"], cfg.record()
    changes = [(k, old.get(k), new.get(k)) for k in RESUME_KEYS if old.get(k) != new.get(k)]
    changes += [(k, n, data.get(k)) for k, n in state["run"]["data"].items() if data.get(k) != n]
    if changes:
        said = "; ".join(f"{k}: {a} there, {b} here" for k, a, b in changes[:3])
        raise UserError(
            f"{out} holds a run of other settings or data ({said}): re-run with its settings to resume it, or"
            " pass --fresh to replace it"
        )
    return state


def _save(path: Path, payload: dict) -> None:
    """torch.save, atomically and durably: a crash leaves the previous checkpoint whole."""
    with atomic_file(path, "wb", durable=True) as f:
        torch.save(payload, f)


def _rng_state(device: torch.device) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] is not None and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
