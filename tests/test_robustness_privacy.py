"""Out-of-distribution sets and membership inference: `rf-train corrupt` writes ImageNet-C-style ImageFolders that
classify scores, deterministically and resumably; `rf-train membership`'s loss-threshold attack finds the members
of an overfit classifier and finds nothing where there is nothing to find."""

import json

import numpy as np
import pytest
from PIL import Image

from realfake.core.files import write_atomic
from realfake.core.images import encode_image
from realfake.training.idx import DEBIAN_DIR, balanced_subset, load_split

from conftest import rf

WNIDS = ("n01440764", "n02119789", "n01751748")


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """Three Fashion-MNIST classes as three ImageNet classes: 16 training images each, and 16 held out each."""
    root = tmp_path_factory.mktemp("three")
    images, labels = load_split(DEBIAN_DIR, "train")
    picked = [i for i in balanced_subset(labels, 32, seed=3) if labels[i] < 3]
    for n, i in enumerate(picked):
        split = "train" if n % 2 == 0 else "held_out"
        png = encode_image(np.repeat(images[i][:, :, None], 3, axis=2), "png")
        write_atomic(root / split / WNIDS[labels[i]] / f"{n:05d}.png", png)
    return root


def test_corrupt_writes_imagenet_c_folders_that_classify_reads(three_classes, tmp_path):
    from realfake.training.corrupt import CorruptConfig, corruption_names, run_corrupt

    assert len(corruption_names("common")) == 15 and "glass_blur" in corruption_names("common")
    out = tmp_path / "c"
    names = ["gaussian_noise", "glass_blur", "frost", "jpeg_compression"]  # glass_blur: scikit-image's new API
    cfg = CorruptConfig(real=three_classes / "held_out", out=out, corruptions=",".join(names), severities=(1, 5),
                        image_format="png", limit_per_class=3, workers=2)  # fmt: skip
    lines = []
    summary = run_corrupt(cfg, log=lines.append)
    assert summary["files"] == 9 * 4 * 2 and summary["written_now"] == 72
    assert sorted(summary["sets"]) == sorted(f"{c}-{s}" for c in names for s in (1, 5))
    source = sorted((three_classes / "held_out" / WNIDS[0]).iterdir())[0]
    clean = np.asarray(Image.open(source).convert("RGB").resize((32, 32), Image.BICUBIC)).astype(int)
    for c in names:
        mild, strong = (np.asarray(Image.open(out / c / str(s) / WNIDS[0] / source.name)).astype(int) for s in (1, 5))
        assert mild.shape == strong.shape == (32, 32, 3)  # 28-px images enlarged to the package's 32
        assert not np.array_equal(mild, clean) and not np.array_equal(strong, mild), c
        if c in ("gaussian_noise", "glass_blur"):  # frost overlays a random crop of frost: not monotone per image
            assert np.abs(strong - clean).mean() > np.abs(mild - clean).mean(), c  # severity 5 is further away
    first = (out / "glass_blur" / "5" / WNIDS[1]).iterdir().__next__()
    data = first.read_bytes()
    first.unlink()
    again = run_corrupt(cfg, log=lines.append)  # resumed: only the missing file, and the same bytes (seeded)
    assert again["written_now"] == 1 and first.read_bytes() == data
    assert json.loads((out / "corrupt.json").read_text())["corruptions"] == names

    r = rf("rf-train", "classify", "--classes", "imagenet", "--model", "resnet-small", "--image-size", "16",
           "--epochs", "1", "--batch-size", "16", "--workers", "0", "--real", str(three_classes / "train"),
           "--val", str(three_classes / "held_out"), "--val", f"noise5={out / 'gaussian_noise' / '5'}",
           "--out", str(tmp_path / "run"))  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    val = json.loads((tmp_path / "run" / "result.json").read_text())["val"]
    assert val["noise5"]["images"] == 9 and val["noise5"]["layout"] == "class folders"

    bad = rf("rf-train", "corrupt", "--real", str(three_classes / "held_out"), "--out", str(tmp_path / "x"),
             "--corruptions", "rain")  # fmt: skip
    assert bad.returncode == 2 and "unknown corruption(s) rain: give common, validation, all or names" in bad.stderr
    bad = rf("rf-train", "corrupt", "--real", str(three_classes / "held_out"), "--out", str(tmp_path / "x"),
             "--severities", "2,6")  # fmt: skip
    assert bad.returncode == 2 and "--severities take values of (1, 2, 3, 4, 5)" in bad.stderr


def test_membership_metrics_of_known_scores():
    from realfake.training.membership import membership_metrics

    member, non = np.ones(500, np.int64), np.zeros(500, np.int64)
    apart = membership_metrics(np.r_[np.full(500, 2.0), np.full(500, 1.0)], np.r_[member, non])
    assert apart["auc"] == 1.0 and apart["tpr_at_1pct_fpr"] == 1.0
    rng = np.random.default_rng(0)
    same = rng.standard_normal(1000)  # the same distribution on both sides: the attack learns nothing
    chance = membership_metrics(same, np.r_[member, non])
    assert abs(chance["auc"] - 0.5) < 0.05 and chance["tpr_at_1pct_fpr"] < 0.05
    scores = np.r_[rng.normal(1, 1, 500), rng.normal(0, 1, 500)]
    shifted = membership_metrics(scores, np.r_[member, non])
    assert 0.70 < shifted["auc"] < 0.82  # d' = 1: AUC = Phi(1 / sqrt 2) = 0.76
    t = shifted["threshold_at_1pct_fpr"]  # the calibration, written out: 99th percentile of non-member scores
    assert t == pytest.approx(np.quantile(scores[500:], 0.99)) and (scores[500:] > t).mean() <= 0.01
    assert shifted["tpr_at_1pct_fpr"] == pytest.approx((scores[:500] > t).mean(), abs=0.01)


def _random_labels(source, target, seed):
    """The images of an ImageFolder under class folders drawn at random: labels only memorising can fit."""
    rng = np.random.default_rng(seed)
    for f in sorted(source.glob("*/*.png")):
        write_atomic(target / WNIDS[rng.integers(3)] / f.name, f.read_bytes())
    return target


def _memorised(train, path):
    """A planted overfit classifier: resnet-small trained on every image of `train` at once, without augmentation,
    until it fits them (its loss on them is near 0), saved as rf-train classify saves one."""
    import torch

    from realfake.core.classes import load_classes
    from realfake.training.classify import RefDataset, build_model, transforms
    from realfake.training.classify_config import ClassifyConfig
    from realfake.training.image_sets import folder_refs

    cfg = ClassifyConfig(classes="imagenet", val=str(train), out=path.parent, real=train, model="resnet-small",
                         image_size=16)  # fmt: skip
    data = RefDataset(folder_refs(train, load_classes("imagenet")), transforms(16, False, True))
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.tensor([data[i][1] for i in range(len(data))])
    torch.manual_seed(0)
    model = build_model("resnet-small", 1000)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert torch.nn.functional.cross_entropy(model(x), y) < 0.1  # it fits what it saw
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "config": cfg.record()}, path)
    return path


def test_membership_finds_an_overfit_models_members_and_not_a_strangers(three_classes, tmp_path):
    """A planted overfit classifier (it memorised 48 images under random labels) gives its members away against
    held-out images under random labels; the same attack against a classifier that saw neither side stays near
    chance."""
    members = _random_labels(three_classes / "train", tmp_path / "members", 1)
    non_members = _random_labels(three_classes / "held_out", tmp_path / "non_members", 2)
    overfit_pt = _memorised(members, tmp_path / "overfit" / "last.pt")
    attack = ["--members", str(members), "--non-members", str(non_members), "--classes", "imagenet"]
    r = rf("rf-train", "membership", "--classifier", str(overfit_pt), *attack, "--out", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr[-2000:]
    overfit = json.loads((tmp_path / "m" / "membership.json").read_text())
    # AUC clearly above 0.5 (48 a side: at 1 % FPR no non-member may pass, so that figure is 0 or noise here)
    assert overfit["auc"] > 0.85 and 0 <= overfit["tpr_at_1pct_fpr"] <= 1, overfit
    assert overfit["members"] == overfit["non_members"] == 48
    assert overfit["member_mean_loss"] < overfit["non_member_mean_loss"]
    assert r.stdout.startswith(f"auc {overfit['auc']:.4f} tpr_at_1pct_fpr ")

    # a stranger: memorised other images (half the held-out ones, other random labels), attacked on members and
    # non-members it never saw
    from realfake.training.membership import MembershipConfig, run_membership

    stranger_data = _random_labels(three_classes / "held_out", tmp_path / "stranger_data", 3)
    for f in sorted(stranger_data.glob("*/*.png"))[::2]:
        f.unlink()
    stranger = _memorised(stranger_data, tmp_path / "stranger" / "last.pt")
    unseen = run_membership(MembershipConfig(stranger, members, _random_labels(three_classes / "train",
                            tmp_path / "relabelled", 4), "imagenet"), log=lambda _: None)  # fmt: skip
    assert abs(unseen["auc"] - 0.5) < 0.15, unseen

    bad = rf("rf-train", "membership", "--classifier", str(tmp_path / "none.pt"), *attack)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    # a checkpoint of another class set, and a file that is no checkpoint: refused in one line, before any image
    from realfake.core.errors import UserError

    with pytest.raises(UserError, match="classifies 1000 classes, not the 10"):
        run_membership(MembershipConfig(overfit_pt, members, non_members, "cifar10"), log=lambda _: None)
    (tmp_path / "text.pt").write_text("not a checkpoint")
    not_ckpt = rf("rf-train", "membership", "--classifier", str(tmp_path / "text.pt"), *attack)
    assert not_ckpt.returncode == 2 and "is not a torch checkpoint" in not_ckpt.stderr
