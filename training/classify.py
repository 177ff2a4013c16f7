"""`rf-train classify`: train a classifier from scratch on synthetic data (optionally mixed with real) and
evaluate top-1/top-5 on a real validation set. Single process, or DDP under `torchrun` (gloo on CPU, nccl on GPU).

Labels come from class ids resolved against one class set, never from folder sort order: the synthetic set's
manifest rows carry class ids, real ImageFolders are matched by folder name (class id or name).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tarfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from realfake.core.classes import ClassInfo, load_classes
from realfake.core.dataset import manifest_files, read_manifest_rows
from realfake.core.errors import UserError
from realfake.core.files import write_atomic
from realfake.core.real_folder import scan_real
from realfake.training.data import jsonable

MODELS = ("resnet50", "resnet18", "resnet-small")


@dataclass
class ClassifyConfig:
    classes: str
    val: Path
    out: Path
    synthetic: Path | None = None
    real: Path | None = None
    real_fraction: float = 1.0
    model: str = "resnet50"
    image_size: int | None = None  # default: 32 for resnet-small, 224 otherwise
    epochs: int = 30
    batch_size: int = 128  # global: divided over DDP processes
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: str = "0.5,0.75"  # fractions of the epochs where the lr is multiplied by gamma
    gamma: float = 0.2
    workers: int = 0
    seed: int = 0
    amp: bool = True  # GPU only
    eval_every: int = 1  # epochs between validations (the last epoch is always validated)

    def validate(self) -> None:
        if self.model not in MODELS:
            raise UserError(f"unknown model {self.model!r}: choose one of {', '.join(MODELS)}")
        if self.synthetic is None and self.real is None:
            raise UserError("give --synthetic, --real, or both: there is nothing to train on")
        if not 0.0 <= self.real_fraction <= 1.0:
            raise UserError(f"--real-fraction must be in [0, 1], got {self.real_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise UserError("--epochs and --batch-size must be >= 1 and --lr > 0")

    @property
    def size(self) -> int:
        return self.image_size or (32 if self.model == "resnet-small" else 224)

    def milestone_epochs(self) -> list[int]:
        try:
            fractions = [float(x) for x in self.milestones.split(",") if x.strip()]
        except ValueError:
            raise UserError(f"--milestones takes comma-separated fractions, got {self.milestones!r}") from None
        return sorted({max(1, round(f * self.epochs)) for f in fractions if 0 < f < 1})


# -- data -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ref:
    """Where one labelled image lives: a file, or a byte range inside a tar shard."""

    path: str
    label: int
    offset: int = -1
    size: int = 0


def synthetic_refs(root: Path, classes: list[ClassInfo]) -> list[Ref]:
    """An rf-client output (manifest rows) or a folder of WebDataset shards (`.cls` members)."""
    by_id = {c.id: c.index for c in classes}
    if not root.is_dir():
        raise UserError(f"--synthetic {root} is not a directory")
    shards = sorted(root.glob("*.tar"))
    if shards:
        return _webdataset_refs(shards, len(classes))
    if not manifest_files(root):
        raise UserError(f"--synthetic {root} has no manifest*.jsonl and no .tar shards: is it an rf-client output?")
    rows = {r["path"]: r for f in manifest_files(root) for r in read_manifest_rows(f)}
    unknown = sorted({r["class_id"] for r in rows.values()} - set(by_id))
    if unknown:
        raise UserError(f"--synthetic {root} has class ids that are not in the class set: {', '.join(unknown[:5])}")
    return [Ref(str(root / p), by_id[r["class_id"]]) for p, r in sorted(rows.items())]


def _webdataset_refs(shards: list[Path], n_classes: int) -> list[Ref]:
    refs = []
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name, m in members.items():
                if not name.endswith(".png"):
                    continue
                cls_member = members.get(name[:-4] + ".cls")
                if cls_member is None:
                    raise UserError(f"{shard}: {name} has no .cls label")
                label = int(tar.extractfile(cls_member).read())
                if not 0 <= label < n_classes:
                    raise UserError(f"{shard}: {name} has label {label}, outside the class set")
                refs.append(Ref(str(shard), label, m.offset_data, m.size))
    return refs


def folder_refs(root: Path, classes: list[ClassInfo]) -> list[Ref]:
    by_id = {c.id: c.index for c in classes}
    return [Ref(str(root / rel), by_id[cid]) for cid, rels in sorted(scan_real(root, classes).items()) for rel in rels]


def stratified_fraction(refs: list[Ref], fraction: float, seed: int) -> list[Ref]:
    """round(fraction x n_c) images of every class c, chosen with a seeded generator."""
    by_label: dict[int, list[Ref]] = defaultdict(list)
    for r in refs:
        by_label[r.label].append(r)
    rng = np.random.default_rng(seed)
    picked = []
    for label in sorted(by_label):
        pool = by_label[label]
        k = round(fraction * len(pool))
        picked += [pool[i] for i in sorted(rng.choice(len(pool), k, replace=False))]
    return picked


class RefDataset(torch.utils.data.Dataset):
    def __init__(self, refs: list[Ref], transform):
        self.refs, self.transform = refs, transform

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
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


def transforms(size: int, train: bool, small: bool):
    from torchvision.transforms import v2

    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.5] * 3)]
    if small:
        aug = [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()] if train else []
        return v2.Compose([v2.Resize((size, size)), *aug, *norm])
    if train:
        return v2.Compose([v2.RandomResizedCrop(size), v2.RandomHorizontalFlip(), *norm])
    return v2.Compose([v2.Resize(round(size * 256 / 224)), v2.CenterCrop(size), *norm])


# -- models ---------------------------------------------------------------------------------------------


def build_model(name: str, num_classes: int) -> torch.nn.Module:
    from torchvision.models import resnet18, resnet50
    from torchvision.models.resnet import BasicBlock

    if name == "resnet50":
        return resnet50(weights=None, num_classes=num_classes)
    if name == "resnet18":
        return resnet18(weights=None, num_classes=num_classes)
    if name == "resnet-small":  # for 28-32 px inputs: 3x3 stem, no max-pool, three stages of basic blocks

        def stage(cin, cout, stride):
            down = None
            if stride != 1 or cin != cout:
                down = torch.nn.Sequential(
                    torch.nn.Conv2d(cin, cout, 1, stride, bias=False), torch.nn.BatchNorm2d(cout)
                )
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
    raise UserError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")


# -- distributed ----------------------------------------------------------------------------------------


def _dist():
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    return dist, world, rank


def _all_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def _epoch_indices(n: int, epoch: int, seed: int, rank: int, world: int) -> np.ndarray:
    """This rank's share of a seeded permutation: disjoint across ranks, no padding, every sample once."""
    return np.random.default_rng([seed, epoch]).permutation(n)[rank::world]


# -- the run --------------------------------------------------------------------------------------------


def run_classify(cfg: ClassifyConfig, log=print) -> dict:
    from torch.nn.parallel import DistributedDataParallel
    from tqdm.auto import tqdm

    cfg.validate()
    classes = load_classes(cfg.classes)
    syn = synthetic_refs(Path(cfg.synthetic), classes) if cfg.synthetic else []
    real_all = folder_refs(Path(cfg.real), classes) if cfg.real else []
    real = stratified_fraction(real_all, cfg.real_fraction, cfg.seed) if real_all else []
    train_refs = syn + real
    if not train_refs:
        raise UserError("the training set is empty")
    val_refs = folder_refs(Path(cfg.val), classes)
    train_labels, val_labels = {r.label for r in train_refs}, {r.label for r in val_refs}
    if train_labels != val_labels:
        name = {c.index: c.id for c in classes}
        only_train = ", ".join(name[i] for i in sorted(train_labels - val_labels)[:5]) or "none"
        only_val = ", ".join(name[i] for i in sorted(val_labels - train_labels)[:5]) or "none"
        raise UserError(
            f"class mismatch between training and validation sets: only in training: {only_train};"
            f" only in validation: {only_val}"
        )

    dist, world, rank = _dist()
    main = rank == 0
    say = log if main else (lambda *_: None)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    small = cfg.model == "resnet-small"
    train_set = RefDataset(train_refs, transforms(cfg.size, True, small))
    val_set = RefDataset(val_refs, transforms(cfg.size, False, small))
    model = build_model(cfg.model, len(classes)).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    ddp = DistributedDataParallel(model) if world > 1 else None
    net = ddp or model
    per_rank_batch = max(1, cfg.batch_size // world)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, cfg.milestone_epochs(), gamma=cfg.gamma)
    use_amp = cfg.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    out = Path(cfg.out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    say(
        f"training {cfg.model} on {len(syn)} synthetic + {len(real)} real images ({len(classes)} classes), "
        f"validating on {len(val_refs)}; {world} process(es)"
    )
    metrics = open(out / "metrics.jsonl", "a") if main else None
    best, history = -1.0, []
    t_start = time.perf_counter()
    for epoch in range(cfg.epochs):
        indices = _epoch_indices(len(train_set), epoch, cfg.seed, rank, world)
        seen = _gather_indices(indices, world, dist)
        loader = torch.utils.data.DataLoader(
            train_set, batch_sampler=_batches(indices, per_rank_batch), num_workers=cfg.workers
        )
        net.train()
        t0, loss_sum, correct, count = time.perf_counter(), 0.0, 0.0, 0.0
        bar = tqdm(
            loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (main and sys.stderr.isatty()), leave=False
        )
        join = ddp.join() if ddp is not None else contextlib.nullcontext()
        with join:
            for images, labels in bar:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                    logits = net(images)
                    loss = torch.nn.functional.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                loss_sum += loss.item() * len(labels)
                correct += (logits.argmax(1) == labels).sum().item()
                count += len(labels)
                bar.set_postfix(loss=f"{loss.item():.3f}")
        scheduler.step()
        loss_sum, correct, count = _all_sum([loss_sum, correct, count], world)
        if (epoch + 1) % max(cfg.eval_every, 1) == 0 or epoch + 1 == cfg.epochs:
            top1, top5 = evaluate(model, val_set, device, rank, world, per_rank_batch, cfg.workers)
        else:
            top1 = top5 = float("nan")
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / count,
            "train_top1": correct / count,
            "val_top1": top1,
            "val_top5": top5,
            "lr": optimizer.param_groups[0]["lr"],
            "samples_seen": int(count),
            "unique_samples": seen,
            "images_per_sec": round(count / (time.perf_counter() - t0), 2),
        }
        history.append(row)
        say(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.3f}, train top-1 {row['train_top1']:.4f}, "
            f"val top-1 {top1:.4f}, top-5 {top5:.4f}"
        )
        if main:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()
            if top1 == top1 and top1 > best:  # NaN: not validated this epoch
                best = top1
                tmp = out / "best.pt.tmp"
                torch.save(
                    {
                        "model": model.state_dict(),
                        "epoch": epoch + 1,
                        "val_top1": top1,
                        "config": jsonable(asdict(cfg)),
                    },
                    tmp,
                )
                os.replace(tmp, out / "best.pt")
    result = {}
    if main:
        metrics.close()
        result = {
            "model": cfg.model,
            "image_size": cfg.size,
            "epochs": cfg.epochs,
            "processes": world,
            "top1": history[-1]["val_top1"],
            "top5": history[-1]["val_top5"],
            "best_top1": best,
            "train": {
                "synthetic": str(cfg.synthetic) if cfg.synthetic else None,
                "synthetic_images": len(syn),
                "real": str(cfg.real) if cfg.real else None,
                "real_available": len(real_all),
                "real_fraction": cfg.real_fraction if cfg.real else None,
                "real_images": len(real),
                "total_images": len(train_refs),
            },
            "val": {"path": str(cfg.val), "images": len(val_refs)},
            "classes": len(classes),
            "wall_seconds": round(time.perf_counter() - t_start, 2),
            "config": jsonable(asdict(cfg)),
        }
        write_atomic(out / "result.json", json.dumps(result, indent=1).encode())
        say(f"top-1 {result['top1']:.4f} (best {best:.4f}), top-5 {result['top5']:.4f} -> {out / 'result.json'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _gather_indices(indices: np.ndarray, world: int, dist) -> int:
    """Unique sample count over all ranks this epoch (equals the dataset size when nothing is duplicated)."""
    if world == 1:
        return len(np.unique(indices))
    gathered: list = [None] * world
    dist.all_gather_object(gathered, indices.tolist())
    return len({i for part in gathered for i in part})


@torch.no_grad()
def evaluate(model, dataset, device, rank: int, world: int, batch: int, workers: int) -> tuple[float, float]:
    """Top-1 and top-5 accuracy over the whole set, each rank taking every world-th image."""
    model.eval()
    subset = torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch, num_workers=workers)
    top1 = top5 = n = 0.0
    for images, labels in loader:
        logits = model(images.to(device))
        labels = labels.to(device)
        k = min(5, logits.shape[1])
        best = logits.topk(k, dim=1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(dim=1).sum().item()
        n += len(labels)
    top1, top5, n = _all_sum([top1, top5, n], world)
    return top1 / max(n, 1), top5 / max(n, 1)


def _batches(indices: np.ndarray, size: int) -> list[list[int]]:
    """Batches of `size`; a last batch of one image joins the previous one (BatchNorm cannot train on 1)."""
    batches = [indices[i : i + size].tolist() for i in range(0, len(indices), size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2] += batches.pop()
    return batches
