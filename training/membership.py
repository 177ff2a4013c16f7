"""`rf-train membership`: how much a trained classifier gives away about which real images it was trained on
(membership inference), for the privacy claim: a classifier trained on synthetic images made from real ones
should leak less about those real images than one trained on them.

The attack is the loss-threshold attack (Yeom et al., 2018), calibrated as follows, with nothing fitted:
  - score(x) = -cross-entropy(classifier(x), label(x)): a model fits its training images better than unseen ones;
  - members are images of the set the question is about (the real training images), non-members held-out real
    images of the same classes, the same number of each (the larger side is subsampled, seeded);
  - every threshold on the score is one attacker: "member if score >= t". The ROC over all thresholds gives the
    AUC (0.5: the classifier tells nothing; 1.0: every member given away) and the TPR at 1 % FPR (the share of
    members found when only 1 % of non-members are wrongly accused: the low-FPR figure that matters for
    privacy, Carlini et al., 2022), with the threshold that achieves it (the 99th percentile of non-member
    scores) written out.
The ROC and AUC are torchmetrics'.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from realfake.core.classes import load_classes
from realfake.core.errors import UserError
from realfake.core.files import write_atomic

LOW_FPR = 0.01


@dataclass
class MembershipConfig:
    classifier: Path  # an rf-train classify checkpoint (best.pt or last.pt)
    members: Path  # ImageFolder: the real images in question (what the classifier, or its data's generator, saw)
    non_members: Path  # ImageFolder: held-out real images of the same classes
    classes: str
    out: Path | None = None  # membership.json here when given
    per_class: int | None = None  # at most this many images of each class on each side
    batch_size: int = 256
    seed: int = 0


def membership_metrics(scores: np.ndarray, is_member: np.ndarray) -> dict:
    """AUC and TPR at 1 % FPR of the threshold attack "member if score >= t" over every t."""
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    scores, target = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(is_member).long()
    if target.sum() == 0 or target.sum() == len(target):
        raise UserError("membership inference needs both members and non-members")
    fpr, tpr, _ = binary_roc(scores, target, thresholds=None)
    low = tpr[fpr <= LOW_FPR]
    non_member = scores[target == 0].numpy()
    return {
        "auc": float(binary_auroc(scores, target, thresholds=None)),
        "tpr_at_1pct_fpr": float(low.max()) if len(low) else 0.0,
        "threshold_at_1pct_fpr": float(np.quantile(non_member, 1 - LOW_FPR)),
        "members": int(target.sum()),
        "non_members": int(len(target) - target.sum()),
    }


def _at_most(refs, per_class: int | None, seed: int):
    """At most `per_class` images of each class (seeded choice)."""
    from realfake.training.image_sets import stratified

    return refs if per_class is None else stratified(refs, seed, lambda n: min(n, per_class))


def loss_scores(model: torch.nn.Module, dataset, batch: int, device: torch.device) -> np.ndarray:
    """-cross-entropy of each image under `model` (eval mode), in dataset order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch)
    out = []
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images.to(device)).float()
            out.append(-torch.nn.functional.cross_entropy(logits, labels.to(device), reduction="none").cpu())
    return torch.cat(out).numpy().astype(np.float64)


def run_membership(cfg: MembershipConfig, log: Callable[[str], None] = print) -> dict:
    from realfake.training.classify import RefDataset, load_checkpoint
    from realfake.training.image_sets import folder_refs

    path, classes = Path(cfg.classifier), load_classes(cfg.classes)
    loaded = load_checkpoint(path, len(classes))
    model, transform = loaded.model, loaded.transform  # the validation transform: no augmentation

    members = _at_most(folder_refs(Path(cfg.members), classes, "--members"), cfg.per_class, cfg.seed)
    non_members = _at_most(folder_refs(Path(cfg.non_members), classes, "--non-members"), cfg.per_class, cfg.seed)
    n = min(len(members), len(non_members))
    if n == 0:
        raise UserError("--members and --non-members must both hold images of the class set")
    rng = np.random.default_rng(cfg.seed)
    members = members.select(np.sort(rng.permutation(len(members))[:n]))
    non_members = non_members.select(np.sort(rng.permutation(len(non_members))[:n]))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    scores = np.concatenate(
        [loss_scores(model, RefDataset(refs, transform), cfg.batch_size, device) for refs in (members, non_members)]
    )
    is_member = np.concatenate([np.ones(n, np.int64), np.zeros(n, np.int64)])
    result = membership_metrics(scores, is_member) | {
        "attack": "loss threshold (score = -cross-entropy)",
        "classifier": str(path),
        "trained_on": {"synthetic": loaded.config.get("synthetic"), "real": loaded.config.get("real")},
        "member_mean_loss": float(-scores[:n].mean()),
        "non_member_mean_loss": float(-scores[n:].mean()),
        "config": json.loads(json.dumps(asdict(cfg), default=str)),
    }
    log(
        f"membership inference on {path}: AUC {result['auc']:.4f}, TPR at 1% FPR {result['tpr_at_1pct_fpr']:.4f} "
        f"({n} members vs {n} non-members; mean loss {result['member_mean_loss']:.3f} vs "
        f"{result['non_member_mean_loss']:.3f})"
    )
    if cfg.out is not None:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "membership.json", json.dumps(result, indent=1).encode())
    return result
