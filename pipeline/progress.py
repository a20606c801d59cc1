"""Progress of long units: a terminal bar (tqdm), periodic lines where the output is not a
terminal (a log file, CI), and, where an orchestrator listens, its own report (the flow
publishes a Prefect progress artifact per unit).

A listener is set per thread of execution (a context variable), so units running side by
side in one process each report to their own.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator, TextIO

# called as listener(fraction_done in [0, 1], description)
LISTENER: ContextVar[Callable[[float, str], None] | None] = ContextVar("curate_progress", default=None)
EVERY_S = 2.0  # the listener hears at most this often (and at the end)
LINE_EVERY_S = float(os.environ.get("CURATE_PROGRESS_EVERY_S", 10))  # a progress line at most this often


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class ProgressLines:
    """Progress as plain lines, for output that is not a terminal (where a bar would be noise).

    Silent for the first `every_s` seconds (short units print nothing); after that a line
    whenever `every_s` seconds have passed or a further tenth of the work is done (at most one
    a second), and a last line at the end if any was printed. `clock` is injectable for tests.
    """

    def __init__(self, total: int, desc: str, unit: str = "", *, out: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic, every_s: float | None = None):
        self.total, self.desc, self.unit = total, desc, unit.strip()
        self.out, self.clock = out, clock
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.start = clock()
        self.last: float | None = None  # when the last line was printed
        self.last_tenth = 0
        self.lines = 0
        self.closed = False  # the end was told

    def line(self, done: int, now: float) -> str:
        elapsed = now - self.start
        unit = f" {self.unit}" if self.unit else ""
        if not self.total:
            return f"{self.desc}: {done}{unit}, {_seconds(elapsed)} elapsed"
        frac = min(done / self.total, 1.0)
        left = f", ~{_seconds(elapsed * (1 - frac) / frac)} left" if 0 < frac < 1 else ""
        return f"{self.desc}: {done}/{self.total}{unit} ({100 * frac:.0f}%), {_seconds(elapsed)} elapsed{left}"

    def update(self, done: int) -> str | None:
        """Tell the reporter `done` items are finished; returns the line it printed, if any."""
        now = self.clock()
        tenth = int(10 * done / self.total) if self.total else 0
        finished = bool(self.total) and done >= self.total
        if self.closed or (now - self.start < self.every_s and not (finished and self.lines)):
            return None
        since = now - (self.last if self.last is not None else self.start)
        due = (self.last is None or since >= self.every_s or (tenth > self.last_tenth and since >= 1.0)
               or (finished and self.lines))
        if not due:
            return None
        self.last, self.last_tenth, self.closed = now, tenth, finished
        self.lines += 1
        text = self.line(done, now)
        out = self.out or sys.stderr
        print(text, file=out, flush=True)
        return text


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextmanager
def progress(total: int, desc: str, unit: str = "") -> Iterator[Callable[[int], None]]:
    """`with progress(n, "embed: proxy epochs") as step: ... step(1)`: a bar on a terminal,
    periodic lines elsewhere."""
    from tqdm import tqdm

    listener = LISTENER.get()
    done, last = 0, 0.0
    terminal = _is_terminal(sys.stderr)
    lines = None if terminal else ProgressLines(total, desc, unit)

    def tell(force: bool = False) -> None:
        nonlocal last
        if listener is not None and total and (force or time.monotonic() - last >= EVERY_S):
            last = time.monotonic()
            listener(min(done / total, 1.0), desc)

    with tqdm(total=total, desc=desc, unit=unit, disable=not terminal) as bar:
        tell(force=True)

        def step(n: int = 1) -> None:
            nonlocal done
            done += n
            bar.update(n)
            if lines is not None:
                lines.update(done)
            tell(force=done >= total)

        yield step
