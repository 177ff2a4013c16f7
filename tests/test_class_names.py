"""ImageNet prompt names: distinct across the 1000 classes, the WordNet lemma kept beside them, and real folders
named by a shared name refused. Fast, no server."""

import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from realfake.client.cli import app
from realfake.core import dataset as ds
from realfake.core.classes import ClassInfo, load_classes
from realfake.core.defaults import DEFAULT_TEMPLATE
from realfake.core.errors import UserError
from realfake.core.real_folder import scan_real

CRANE_BIRD, CRANE_MACHINE = "n02012849", "n03126707"
MAILLOTS = ("n03710637", "n03710721")


@pytest.fixture(scope="module")
def imagenet() -> list[ClassInfo]:
    return load_classes("imagenet")


def test_imagenet_names_are_distinct_and_non_empty(imagenet):
    assert len(imagenet) == 1000
    assert all(c.name.strip() == c.name and c.name for c in imagenet)
    assert len({c.name.casefold() for c in imagenet}) == 1000
    prompts = {ds.render_prompt(DEFAULT_TEMPLATE, c.name) for c in imagenet}
    assert len(prompts) == 1000 and len({p.casefold() for p in prompts}) == 1000


def test_the_shared_lemmas_get_different_names(imagenet):
    by_id = {c.id: c for c in imagenet}
    for a, b in ((CRANE_BIRD, CRANE_MACHINE), MAILLOTS, ("n02113186", "n02963159")):  # + Cardigan / cardigan
        assert by_id[a].lemma.casefold() == by_id[b].lemma.casefold()
        assert by_id[a].name.casefold() != by_id[b].name.casefold()
    assert "bird" in by_id[CRANE_BIRD].name and "crane" in by_id[CRANE_MACHINE].name
    assert by_id["n01608432"].name != "kite"  # the bird of prey, not the toy


def test_lemma_keeps_the_first_wordnet_lemma(imagenet):
    assert (imagenet[0].id, imagenet[0].name, imagenet[0].lemma) == ("n01440764", "tench", "tench")
    by_id = {c.id: c for c in imagenet}
    assert by_id[CRANE_BIRD].lemma == by_id[CRANE_MACHINE].lemma == "crane"
    assert [by_id[m].lemma for m in MAILLOTS] == ["maillot", "maillot"]
    assert by_id["n02113186"].lemma == "Cardigan" and by_id["n02963159"].lemma == "cardigan"
    changed = [c for c in imagenet if c.name != c.lemma]
    assert 2 <= len(changed) < 500  # most classes keep their lemma as the prompt name


def _folders(root, *names):
    for name in names:
        (root / name).mkdir()
        Image.new("RGB", (8, 8)).save(root / name / "a.png")


def test_scan_real_refuses_a_shared_name(tmp_path, imagenet):
    _folders(tmp_path, "crane", "tench")
    with pytest.raises(UserError) as err:
        scan_real(tmp_path, imagenet)
    msg = str(err.value)
    assert "\n" not in msg and "'crane'" in msg and CRANE_BIRD in msg and CRANE_MACHINE in msg
    assert "class id" in msg


def test_scan_real_refuses_a_name_shared_up_to_case(tmp_path, imagenet):
    _folders(tmp_path, "cardigan")
    with pytest.raises(UserError, match="n02113186.*n02963159"):
        scan_real(tmp_path, imagenet)


def test_scan_real_resolves_ids_and_unique_names(tmp_path, imagenet):
    _folders(tmp_path, CRANE_BIRD, CRANE_MACHINE, "tench", "kite (bird of prey)", "construction crane")
    found = scan_real(tmp_path, imagenet)
    assert found == {
        CRANE_BIRD: [f"{CRANE_BIRD}/a.png"],
        CRANE_MACHINE: ["construction crane/a.png", f"{CRANE_MACHINE}/a.png"],
        "n01440764": ["tench/a.png"],
        "n01608432": ["kite (bird of prey)/a.png"],
    }


def test_scan_real_by_unique_lemma(tmp_path, imagenet):
    _folders(tmp_path, "kite")  # the lemma: only one class carries it
    assert scan_real(tmp_path, imagenet) == {"n01608432": ["kite/a.png"]}


def test_classes_command_shows_name_and_lemma():
    r = CliRunner().invoke(app, ["classes", "imagenet", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) == 1000
    crane = next(row for row in rows if row["id"] == CRANE_BIRD)
    assert crane == {"index": 134, "id": CRANE_BIRD, "name": crane["name"], "lemma": "crane"}
    assert crane["name"] != "crane"
    r = CliRunner().invoke(app, ["classes", "imagenet"])
    assert r.exit_code == 0
    line = r.output.splitlines()[134].split("\t")
    assert line == ["134", CRANE_BIRD, crane["name"], "crane"]


def test_other_sets_keep_lemma_equal_to_name(tmp_path):
    cifar = load_classes("cifar10")
    assert [(c.id, c.name) for c in cifar][:2] == [("airplane", "airplane"), ("automobile", "automobile")]
    assert all(c.lemma == c.name for c in cifar)
    (tmp_path / "a.txt").write_text("Red Fox\ncat\n")
    assert [(c.index, c.id, c.name, c.lemma) for c in load_classes(str(tmp_path / "a.txt"))] == [
        (0, "red_fox", "Red Fox", "Red Fox"),
        (1, "cat", "cat", "cat"),
    ]
    assert ClassInfo(0, "c", "c") == ClassInfo(0, "c", "c", "c")
    with pytest.raises(AttributeError):
        ClassInfo(0, "c", "c").lemma = "x"  # type: ignore[misc]
