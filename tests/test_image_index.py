"""The classifier's training index as arrays: the same images, labels, order and subsets as the per-row objects
it replaced, and a size that holds 13 M rows in well under 1 GB per rank."""

import json
from pathlib import Path

import numpy as np
import pytest

from realfake.core.classes import ClassInfo, load_classes
from realfake.core.errors import UserError
from realfake.training.image_sets import Ref, RefTable, _TableBuilder, stratified_fraction, synthetic_refs


def _old_stratified(refs: list[Ref], fraction: float, seed: int) -> list[Ref]:
    """The subset as it was chosen before (a list per class, in the order of the refs)."""
    by_label: dict[int, list[Ref]] = {}
    for r in refs:
        by_label.setdefault(r.label, []).append(r)
    rng = np.random.default_rng(seed)
    picked = []
    for label in sorted(by_label):
        pool = by_label[label]
        picked += [pool[i] for i in sorted(rng.choice(len(pool), round(fraction * len(pool)), replace=False))]
    return picked


def _manifest(folder: Path, rows: list[dict], name="manifest.jsonl") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_manifest_gives_the_refs_a_dict_of_its_rows_gave(tmp_path):
    classes = [ClassInfo(0, "n1", "a"), ClassInfo(1, "n2", "b"), ClassInfo(2, "n3", "c")]
    rng = np.random.default_rng(0)
    order = rng.permutation(50).tolist()
    rows = [{"path": f"{c}/{i:05d}.jpg", "class_id": c, "index": i} for i in order for c in ("n2", "n1")]
    rows.append({"path": "n1/00003.jpg", "class_id": "n3", "index": 3})  # a path listed twice: its last row wins
    _manifest(tmp_path / "syn", rows[:60], "manifest.shard-0-of-2.jsonl")
    _manifest(tmp_path / "syn", rows[60:], "manifest.shard-1-of-2.jsonl")
    by_id = {c.id: c.index for c in classes}
    old = {r["path"]: r for r in rows}
    expected = [Ref(str(tmp_path / "syn" / p), by_id[r["class_id"]]) for p, r in sorted(old.items())]
    table = synthetic_refs(tmp_path / "syn", classes)
    assert isinstance(table, RefTable) and list(table) == expected and len(table) == 100
    assert table.label_set() == {0, 1, 2}
    _manifest(tmp_path / "bad", [{"path": "x/1.jpg", "class_id": "n9", "index": 1}])
    with pytest.raises(UserError, match="class ids that are not in the class set: n9"):
        synthetic_refs(tmp_path / "bad", classes)


def test_subsets_and_joins_are_the_ones_the_lists_made():
    rng = np.random.default_rng(1)
    rows = _TableBuilder()
    refs = []
    for k, label in enumerate(rng.integers(0, 7, 500)):
        rows.add("/real", f"c{label}/{k}.JPEG", int(label))
        refs.append(Ref(f"/real/c{label}/{k}.JPEG", int(label)))
    table = rows.table()
    for fraction in (0.0, 0.1, 0.37, 1.0):
        assert list(stratified_fraction(table, fraction, seed=5)) == _old_stratified(refs, fraction, seed=5)
    shards = _TableBuilder()
    shards.add("/wds/shard-00000.tar", "", 3, 512, 1000)
    joined = shards.table() + table
    assert joined[0] == Ref("/wds/shard-00000.tar", 3, 512, 1000) and list(joined)[1:] == refs
    assert len(RefTable.empty() + table) == 500


def test_thirteen_million_rows_fit_well_under_a_gigabyte():
    """1.3 M rows with ImageNet's names at 10x (n01440764/n01440764_10026.v9.jpg): the bytes per row bound 13 M.
    Before, each row was a Ref object plus its path string (~250 bytes), and the manifest's row dicts (~2.8 KB
    each) were all held while it was built."""
    wnids = [c.id for c in load_classes("imagenet")]
    rows = _TableBuilder()
    for k in range(1_300_000):
        wnid = wnids[k % 1000]
        rows.add("/data/in1k-rf-10x", f"{wnid}/{wnid}_{k // 10:05d}.v{k % 10}.jpg", k % 1000)
    table = rows.table()
    per_row = table.nbytes / len(table)
    assert len(table) == 1_300_000 and per_row < 45, per_row  # 32-byte names, 4-byte root and label
    assert 13_000_000 * per_row < 0.6e9
    assert table[123_456].path == f"/data/in1k-rf-10x/{wnids[456]}/{wnids[456]}_12345.v6.jpg"
