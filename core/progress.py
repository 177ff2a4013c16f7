"""Progress of long work as plain lines, for logs that no one watches live: a pod's log, a Slurm task's output
file. Every `RF_PROGRESS_EVERY` seconds (default 60), and once at the end, one line:

    generate: 120400/1300000 (9.3%), 412.5 img/s, ETA 47m40s, 3 failed, servers up 8/8

A terminal gets a live bar instead (the commands' own); these lines are for when stderr is not a terminal, or
the bar is turned off (`--quiet`), so unattended work is never silent for hours.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

PROGRESS_EVERY_ENV = "RF_PROGRESS_EVERY"
DEFAULT_PROGRESS_EVERY = 60.0  # seconds between lines


def progress_every() -> float:
    raw = os.environ.get(PROGRESS_EVERY_ENV, "")
    try:
        value = float(raw) if raw else DEFAULT_PROGRESS_EVERY
    except ValueError:
        value = DEFAULT_PROGRESS_EVERY
    return max(value, 0.0)


def is_terminal(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class ProgressLines:
    """Call `update(done, failed=..., extra=...)` as work finishes (cheap: it prints only when a line is due) and
    `close()` at the end (a last line). `done` counts what this run finished, out of `total`; `unit` names it."""

    def __init__(
        self, label: str, total: int, unit: str = "img", every: float | None = None, write: Callable | None = None
    ):
        self.label, self.total, self.unit = label, total, unit
        self.every = progress_every() if every is None else every
        self.write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self.start = self.last = time.monotonic()
        self.done = self.failed = 0
        self.extra = ""

    def update(self, done: int, failed: int = 0, extra: str = "", total: int | None = None) -> None:
        self.done, self.failed, self.extra = done, failed, extra
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.write(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        finished = self.done + self.failed
        rate = self.done / elapsed
        pct = 100.0 * finished / self.total if self.total else 100.0
        left = self.total - finished
        eta = duration(left / rate) if rate > 0 and left > 0 else ("0s" if left <= 0 else "unknown")
        if self.total > 0:
            parts = [f"{self.label}: {finished}/{self.total} ({pct:.1f}%)", f"{rate:.1f} {self.unit}/s", f"ETA {eta}"]
        else:  # a total not known in advance
            parts = [f"{self.label}: {finished} {self.unit}", f"{rate:.1f} {self.unit}/s"]
        parts.append(f"{self.failed} failed")
        if self.extra:
            parts.append(self.extra)
        return ", ".join(parts)

    def close(self) -> None:
        self.write(self.line())
