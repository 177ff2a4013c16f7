"""What every realfake command line shares: one vocabulary (the same concept has the same option name and values
in rf-train, rf-export, rf-serve, rf-client and rf-demo), the old spellings translated with a note, one-line user
errors (exit 2), tracebacks only with --debug."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Literal

import typer

from realfake.core.defaults import GUIDANCE_TOKEN_MODES, PLACEMENTS, RUNTIMES, SCHEDULERS
from realfake.core.errors import UserError
from realfake.core.images import FORMATS

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.")]
PartialCaptions = Annotated[
    bool,
    typer.Option(
        "--partial-captions",
        help="Accept a --captions file that covers only some real images (the rest: class prompt).",
    ),
]

# -- the vocabulary ---------------------------------------------------------------------------------------------
# One option name per concept, in every command that has the concept; tests/test_vocabulary.py walks every
# command's options against this table and the old spellings below.
VOCABULARY = {
    "precision": "--precision",  # auto, fp32, fp16, bf16 (int8 where it applies); auto: core.precision's rule
    "images per call": "--batch-size",  # each help text says per request, per process or global
    "a list of images-per-call sizes": "--batch-sizes",
    "the largest batch a server forms": "--max-batch-size",
    "real images": "--real",  # an ImageFolder of real images: what a command reads them from
    "where a command writes": "--out",  # always named, never positional, never a working-directory default
    "start over": "--fresh",  # re-running resumes; --fresh forgets what OUT holds first
    "how a server runs the graphs": "--runtime",  # RUNTIMES, one name each
    "where the graphs run": "--placement",
    "classifier-free guidance scale": "--guidance-scale",
    "a model served on this machine": "--local",  # a repository, a diffusers bundle, or `tiny` (said explicitly)
    "accept captions for only some real images": "--partial-captions",
    "the side of the images a model trains on": "--image-size",  # finetune, classify (diffusers: --resolution)
    "data-loading processes per training process": "--workers",
    "a training run's length in passes over the data": "--epochs",
    "how the learning rate moves over a run": "--lr-schedule",  # each command's schedules, typed choices
    "a known recipe's settings, under the options given": "--recipe",
}

# Fixed choices as types: --help lists the values, a wrong one is one line naming them, and the value is a plain
# string. Each command offers the precisions that apply to it.
Precision = Literal["auto", "fp32", "fp16", "bf16"]
ServePrecision = Literal["auto", "fp32", "fp16", "bf16", "int8"]
CpuPrecision = Literal["auto", "fp32", "bf16", "int8"]  # the demo's CPU runtimes
Runtime = Literal[RUNTIMES]
DemoRuntime = Literal["python-ort", "openvino"]
Scheduler = Literal[SCHEDULERS]
Placement = Literal[PLACEMENTS]
ImageFormat = Literal[tuple(FORMATS)]
GuidanceToken = Literal[GUIDANCE_TOKEN_MODES]


@dataclass(frozen=True)
class Old:
    """An old spelling of an option that still works, rewritten to the new one before the command parses it.
    `new`: the option's new name (its value follows, as given); `tokens`: what a flag becomes instead;
    `values`: old values of the option, each with the tokens it becomes; `bare`: what an old flag of the same
    name (no value after it) becomes."""

    new: str | None = None
    tokens: tuple[str, ...] | None = None
    values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    bare: tuple[str, ...] | None = None  # what the option becomes when no value follows it (an old flag)


_DEMO = {
    "--guidance": Old("--guidance-scale"),
    "--runtime": Old(
        values={
            "onnxruntime": ("--runtime", "python-ort"),
            "openvino-fp32": ("--runtime", "openvino", "--precision", "fp32"),
            "openvino-bf16": ("--runtime", "openvino", "--precision", "bf16"),
            "openvino-int8": ("--runtime", "openvino", "--precision", "int8"),
        }
    ),
}
# (program, command) -> old option -> what it is now. Positional outputs that became --out are taken by the
# commands themselves (a hidden argument), since only the command knows its arguments.
OLD_SPELLINGS: dict[tuple[str, str | None], dict[str, Old]] = {
    ("rf-train", "finetune"): {
        "--data": Old("--real"),
        "--mixed-precision": Old("--precision", values={"no": ("--precision", "fp32")}),
        "--guidance-token": Old(bare=("--guidance-token", "on")),
        "--no-guidance-token": Old(tokens=("--guidance-token", "off")),
    },
    ("rf-train", "caption"): {"--data": Old("--real")},
    ("rf-train", "classify"): {
        "--amp": Old(tokens=("--precision", "auto")),
        "--no-amp": Old(tokens=("--precision", "fp32")),
        "--resume": Old(tokens=()),
    },
    ("rf-train", "demo"): _DEMO,
    ("rf-demo", None): _DEMO,
    ("rf-client", "generate"): {"--batch": Old("--batch-size"), "--guidance": Old("--guidance-scale")},
    ("rf-client", "bench"): {"--batch": Old("--batch-sizes"), "--guidance": Old("--guidance-scale")},
    ("rf-export", "repo"): {
        "--max-batch": Old("--max-batch-size"),
        "--dtype": Old("--precision"),
        "--components": Old("--placement"),
    },
    ("rf-export", "engines"): {
        "--fp16": Old(tokens=("--precision", "fp16")),
        "--no-fp16": Old(tokens=("--precision", "fp32")),
    },
    ("rf-export", "quantize"): {"--guidance": Old("--guidance-scale")},
}


def translate_argv(prog: str, argv: Sequence[str], has_commands: bool) -> tuple[list[str], list[str]]:
    """`argv` (without the program) with the old spellings of `prog`'s command rewritten, and one note per old
    spelling used. `has_commands`: the program has subcommands (the first word that is no option names it)."""
    command = next((a for a in argv if not a.startswith("-")), None) if has_commands else None
    table = OLD_SPELLINGS.get((prog, command), {})
    out: list[str] = []
    notes: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if token == "--":
            out += args[i - 1 :]
            break
        name, eq, inline = token.partition("=")
        old = table.get(name)
        if old is None:
            out.append(token)
            continue
        if old.tokens is not None:
            out += old.tokens
            notes[name] = f"{name} is now {' '.join(old.tokens) or 'the default (drop it)'}"
            continue
        if not eq and old.bare is not None and (i == len(args) or args[i].startswith("-")):
            out += old.bare
            notes[name] = f"{name} alone is now {' '.join(old.bare)}"
            continue
        if eq:
            value = inline
        elif i < len(args):
            value, i = args[i], i + 1
        else:  # the option without its value: the command's own parser says so, under the new name
            out.append(old.new or name)
            continue
        if value in old.values:
            out += old.values[value]
            notes[f"{name} {value}"] = f"{name} {value} is now {' '.join(old.values[value])}"
        elif old.new:
            out += [old.new, value]
            notes[name] = f"{name} is now {old.new}"
        else:
            out += [name, value]
    return out, [f"note: {text} (the old spelling still works, for now)" for text in notes.values()]


def moved_to_out(positional, out, argument: str = "OUT"):
    """The output of a command whose positional OUT became --out: the old positional still works, with a note."""
    if positional is not None:
        if out is not None and out != positional:
            raise UserError(f"give the output once: --out {out} or the old positional {argument} {positional}")
        print(
            f"note: the positional {argument} is now --out {positional} (the old spelling still works, for now)",
            file=sys.stderr,
        )
        return positional
    if out is None:
        raise UserError("missing option --out: where to write")
    return out


def make_app(help_text: str, no_args_is_help: bool = True) -> typer.Typer:
    """A Typer app with the shared conventions: help on no arguments, plain help text (flags show no value
    placeholder, choices are listed), plain tracebacks, no completion."""
    return typer.Typer(
        help=help_text,
        no_args_is_help=no_args_is_help,
        pretty_exceptions_enable=False,
        add_completion=False,
        rich_markup_mode=None,
    )


def int_list(text: str, option: str) -> list[int]:
    """Comma-separated integers >= 1 of a CLI option, or one clear error naming the option."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} takes integers >= 1, got {text!r}")
    return values


_signals: list[int] = []


def _terminate(signum, frame) -> None:
    """SIGTERM (Kubernetes, Slurm, systemd, docker stop) and SIGHUP (a closed terminal) unwind like Ctrl-C, so
    finished work is recorded and child servers are stopped. The signal is remembered, since the CLI framework may
    re-raise a plain KeyboardInterrupt."""
    _signals.append(signum)
    raise KeyboardInterrupt


def _interrupted() -> None:
    print("interrupted: finished work is kept; run the same command again to resume", file=sys.stderr)
    sys.exit(128 + (_signals[-1] if _signals else signal.SIGINT))


def run_cli(app: Callable[[], object], prog: str | None = None, has_commands: bool = True) -> None:
    """Run a Typer app as the command `prog` (rf-train, rf-export, ...): old spellings are rewritten first, with a
    note each; user errors are one line and exit 2; Ctrl-C, SIGTERM and SIGHUP keep finished work."""
    if prog is not None:
        sys.argv[1:], notes = translate_argv(prog, sys.argv[1:], has_commands)
        for note in notes:
            print(note, file=sys.stderr)
    debug = "--debug" in sys.argv
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    try:
        app()
    except UserError as exc:
        if debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
    except SystemExit as exc:
        if exc.code == 130:  # Typer turns KeyboardInterrupt into exit code 130
            _interrupted()
        raise
    except Exception as exc:  # noqa: BLE001 - the last line of defence of a CLI
        if debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"internal error: {type(exc).__name__}: {first} (re-run with --debug for the traceback)", file=sys.stderr)
        sys.exit(1)
