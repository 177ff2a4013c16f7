"""What every realfake command line shares: one-line user errors (exit 2), tracebacks only with --debug."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from realfake.core.errors import UserError

Debug = Annotated[bool, typer.Option("--debug", help="Show tracebacks of internal errors.")]


def make_app(help_text: str) -> typer.Typer:
    """A Typer app with the shared conventions: help on no arguments, plain tracebacks, no completion."""
    return typer.Typer(help=help_text, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)


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


def run_cli(app: Callable[[], object]) -> None:
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
