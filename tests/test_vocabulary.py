# ruff: noqa: E501 - the table of old and new argv reads best one case a line
"""One vocabulary across the five commands: every option of rf-train, rf-export, rf-serve, rf-client and rf-demo
walked against the table in realfake.core.cli, so a concept spelled two ways fails here; the old spellings are
rewritten to the new ones with one note each."""

from __future__ import annotations

import re

import pytest
import typer

from realfake.core.cli import OLD_SPELLINGS, VOCABULARY, translate_argv
from realfake.core.errors import UserError
from realfake.core.precision import resolve_precision

from conftest import rf

# options whose values are a fixed set: --help must list them, a wrong one is refused by the parser
CHOICES = (
    "--runtime",
    "--scheduler",
    "--placement",
    "--format",
    "--guidance-token",
    "--precision",
    "--lr-schedule",
    "--recipe",
    "--interpolation",
)
# other spellings of a concept in the table (any command using one of these fails)
OTHER_SPELLINGS = {
    "--precision": re.compile(r"^--(no-)?(dtype|fp16|bf16|amp|mixed-precision|half)$"),
    "--batch-size": re.compile(r"batch(?!-size$|-sizes$)"),
    "--real": re.compile(r"^--(data|real-dir|images|train-dir)$"),
    "--out": re.compile(r"^--(output|output-dir|out-dir|target|dest)$"),
    "--fresh": re.compile(r"^--(no-)?(resume|restart|overwrite|clean)$|^--no-fresh$"),
    "--guidance-scale": re.compile(r"^--(guidance|cfg|cfg-scale)$"),
    "--image-size": re.compile(r"^--(resolution|size|img-size|input-size)$"),
    "--workers": re.compile(r"^--(num-workers|dataloader-workers|loader-workers|jobs)$"),
    "--epochs": re.compile(r"^--(num-epochs|num-train-epochs|train-epochs)$"),
    "--lr-schedule": re.compile(r"^--(sched|lr-sched|lr-scheduler|lr-scheduler-type)$"),
    "--recipe": re.compile(r"^--(training-recipe|train-recipe|classify-preset)$"),  # NNCF's --preset is its own
}


def _commands():
    """(program, command name, click command) of every command of the five programs."""
    from realfake.client.cli import app as client_app
    from realfake.client.cli import serve_app
    from realfake.export.cli import app as export_app
    from realfake.training.cli import app as train_app
    from realfake.training.cli import demo_app

    programs = {"rf-client": client_app, "rf-export": export_app, "rf-train": train_app}
    for prog, app in programs.items():
        group = typer.main.get_command(app)
        for name, command in group.commands.items():
            yield prog, name, command
    yield "rf-serve", None, typer.main.get_command(serve_app)
    yield "rf-demo", None, typer.main.get_command(demo_app)


COMMANDS = list(_commands())


def _visible_options(command):
    for param in command.params:
        if param.param_type_name == "option" and not param.hidden:
            yield param, [*param.opts, *param.secondary_opts]


def test_no_concept_is_spelled_two_ways():
    assert sum(1 for _, _, c in COMMANDS for _ in _visible_options(c)) > 150  # the walk sees the options
    wrong = []
    for prog, name, command in COMMANDS:
        where = f"{prog} {name or ''}".strip()
        for _param, names in _visible_options(command):
            for opt in names:
                for concept, other in OTHER_SPELLINGS.items():
                    if other.search(opt) and opt != concept:
                        wrong.append(f"{where}: {opt} (the vocabulary says {concept})")
        for param in command.params:  # an output is --out, never a positional argument
            if param.param_type_name == "argument" and not param.hidden and param.name in ("out", "target", "output"):
                wrong.append(f"{where}: positional {param.name.upper()} (the vocabulary says --out)")
    assert not wrong, "\n".join(wrong)


def test_fixed_choices_are_listed_in_help():
    untyped = []
    for prog, name, command in COMMANDS:
        for param, names in _visible_options(command):
            if set(names) & set(CHOICES) and not param.type_descriptor.is_choice:
                untyped.append(f"{prog} {name}: {names[0]} takes any string")
    assert not untyped, "\n".join(untyped)
    r = rf("rf-export", "engines", "--help", env={"COLUMNS": "200"})
    assert "--precision <auto|fp32|fp16|bf16>" in r.stdout
    r = rf("rf-client", "generate", "--help", env={"COLUMNS": "200"})
    assert "--format <png|jpeg|webp>" in r.stdout and "<bool>" not in r.stdout and "--no-quiet" not in r.stdout


def test_every_table_entry_is_in_use_and_every_old_spelling_points_at_a_real_option():
    used = {opt for _, _, command in COMMANDS for _, names in _visible_options(command) for opt in names}
    assert set(VOCABULARY.values()) - used == set()
    options = {(prog, name): {o for _, ns in _visible_options(command) for o in ns} for prog, name, command in COMMANDS}
    for (prog, name), table in OLD_SPELLINGS.items():
        assert (prog, name) in options, (prog, name)
        for old, rule in table.items():
            targets = [rule.new] if rule.new else []
            targets += [t for t in (rule.tokens or ()) + (rule.bare or ()) if t.startswith("--")]
            targets += [t for ts in rule.values.values() for t in ts if t.startswith("--")]
            assert (targets or rule.tokens == ()) and set(targets) <= options[(prog, name)], (prog, name, old, targets)
            if rule.new or rule.tokens is not None:
                assert old not in options[(prog, name)], f"{prog} {name} still shows {old}"


@pytest.mark.parametrize(
    "prog, argv, expected, notes",
    [
        ("rf-train", ["finetune", "--data", "D", "--mixed-precision", "no"], ["finetune", "--real", "D", "--precision", "fp32"], 2),
        ("rf-train", ["finetune", "--data=D", "--no-guidance-token"], ["finetune", "--real", "D", "--guidance-token", "off"], 2),
        ("rf-train", ["finetune", "--guidance-token", "--seed", "1"], ["finetune", "--guidance-token", "on", "--seed", "1"], 1),
        ("rf-train", ["finetune", "--guidance-token", "off"], ["finetune", "--guidance-token", "off"], 0),
        ("rf-train", ["classify", "--no-amp", "--resume"], ["classify", "--precision", "fp32"], 2),
        ("rf-client", ["generate", "--batch", "8", "--batch", "4"], ["generate", "--batch-size", "8", "--batch-size", "4"], 1),
        ("rf-client", ["bench", "--batch", "1,4"], ["bench", "--batch-sizes", "1,4"], 1),
        ("rf-export", ["engines", "X", "--no-fp16"], ["engines", "X", "--precision", "fp32"], 1),
        ("rf-export", ["repo", "X", "--dtype", "int8", "--max-batch", "2"], ["repo", "X", "--precision", "int8", "--max-batch-size", "2"], 2),
        ("rf-demo", ["--runtime", "openvino-int8"], ["--runtime", "openvino", "--precision", "int8"], 1),
        ("rf-demo", ["--runtime", "openvino"], ["--runtime", "openvino"], 0),
        # another command's old spelling is not this one's, and nothing after `--` is touched
        ("rf-client", ["verify", "--batch", "2", "--", "--data"], ["verify", "--batch", "2", "--", "--data"], 0),
    ],
)  # fmt: skip
def test_old_spellings_are_rewritten_with_one_note_each(prog, argv, expected, notes):
    out, said = translate_argv(prog, argv, has_commands=prog not in ("rf-demo", "rf-serve"))
    assert out == expected and len(said) == notes
    assert all(n.startswith("note: ") and "old spelling still works" in n for n in said)


def test_old_spelling_through_the_real_command_says_the_new_one(tmp_path):
    r = rf(
        "rf-train", "caption", "--data", str(tmp_path / "none"), "--model", str(tmp_path), "--out", str(tmp_path / "c")
    )
    assert r.stderr.splitlines()[0] == "note: --data is now --real (the old spelling still works, for now)"
    assert r.returncode == 2 and r.stderr.splitlines()[-1].startswith("error: ")
    r = rf("rf-export", "tiny-bundle", str(tmp_path / "b"), "--no-image-encoder")
    assert r.returncode == 0, r.stderr
    assert "note: the positional OUT is now --out" in r.stderr and (tmp_path / "b" / "model_index.json").is_file()


def test_the_tiny_model_is_never_a_silent_default(tmp_path):
    r = rf("rf-serve")
    assert r.returncode == 2 and "Missing option '--repo'" in r.stderr
    r = rf("rf-client", "bench", "--out", str(tmp_path / "b"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: say which server to measure")
    r = rf("rf-serve", "--repo", str(tmp_path))
    assert r.returncode == 2 and "not a Triton model repository" in r.stderr and "`tiny`" in r.stderr


def test_auto_is_one_rule():
    assert resolve_precision("auto", gpu=False, bf16=True) == "fp32"
    assert resolve_precision("auto", gpu=True, bf16=True) == "bf16"
    assert resolve_precision("auto", gpu=True, bf16=False) == "fp16"
    assert resolve_precision("int8", gpu=False, bf16=False) == "int8"
    with pytest.raises(UserError, match=r"--precision takes auto, fp32, fp16, bf16, got 'int8'"):
        resolve_precision("int8", gpu=True, bf16=True, choices=("auto", "fp32", "fp16", "bf16"))


def test_batch_errors_name_the_option_given():
    from pathlib import Path

    from realfake.client.generate import GenerateConfig

    for field, option in (("batch_size", "--batch-size"), ("concurrency", "--concurrency"), ("versions", "--versions")):
        cfg = GenerateConfig(classes="cifar10", out=Path("x"), per_class=1, urls=["127.0.0.1:8000"], **{field: 0})
        with pytest.raises(UserError, match=f"^{option} must be >= 1, got 0$"):
            cfg.check()
